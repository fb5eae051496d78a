"""prunetune."""
