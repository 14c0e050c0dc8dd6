"""`medforge-train`: an institution's LoRA contribution, trained with peft on its own data."""

VERSION = "0.1.0"
