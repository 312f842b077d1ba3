"""token-agent: local authentication agent for clinical workstations."""

__version__ = "0.1.0"
