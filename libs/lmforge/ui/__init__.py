"""`lmforge ui`: the status page (feed.py follows lmforge, render.py draws, server.py serves)."""
