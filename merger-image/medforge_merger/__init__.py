"""medforge-merge: merges verified LoRA contributions into a composite revision."""
