"""`lmforge report RUN`: one self-contained HTML page about a run, with its plots embedded."""
