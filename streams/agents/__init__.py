"""Faust agents: thin wiring that validates, calls model/, and publishes."""
