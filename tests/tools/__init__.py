"""Tests of animevq.tools (a package, so that its conftest has a name of its own)."""
