"""Custom checkov policies for infra/ (see rotation_checks.py)."""
