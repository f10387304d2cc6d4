"""sandtrap: a high-interaction SSH honeypot that puts every attacker into a real, throw-away sandbox."""

__version__ = "0.1.0"
