"""Local stand-ins (PostgreSQL, Azurite, Key Vault emulator) for tests and the demo."""
