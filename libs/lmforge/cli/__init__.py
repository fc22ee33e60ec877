"""The `lmforge` command."""
