"""Drop-in CREDIT for other trainers (TRL, verl)."""
