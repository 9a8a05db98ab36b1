"""Rotation engine, ledger, configuration and event parsing shared by every trigger."""
