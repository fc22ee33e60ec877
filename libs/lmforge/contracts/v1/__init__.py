"""Generated from proto/lmforge/v1. Do not edit."""
