"""The files of MedForge artifacts, named once for every part: what a training Job uploads, what
a merge Job uploads, and the manifest that lists and hashes them."""

MANIFEST_FILE = "manifest.json"
ADAPTER_FILE = "adapter.safetensors"  # LoRA factors, keyed by the base model's module names
HEAD_FILE = "head.safetensors"  # a linear head's weights (linear-head tasks only)
DISTILLED_FILE = "distilled.safetensors"  # the distilled summary set the merger scores on
MIXTURE_FILE = "mixture.safetensors"  # a mixture composite's adapters and weights
TASKS_FILE = "tasks.safetensors"  # the tasks a composite was scored on, with their sets
RESULT_FILE = "result.json"  # a merge's full result (inputs, metrics), of any size
# Per-file fingerprints (hashes of name and size, never content) of what a contribution trained
# on: the hospital's own evaluation Jobs count how much of an evaluation set it already saw.
FINGERPRINTS_FILE = "fingerprints.json"
EVALUATION_FILE = "evaluation.json"  # a site's aggregate figures for a candidate revision

# Upload URLs the operator signs for each kind of Job (a Job may leave optional ones unused).
CONTRIBUTION_FILES = (ADAPTER_FILE, HEAD_FILE, MANIFEST_FILE, DISTILLED_FILE, FINGERPRINTS_FILE)
COMPOSITE_FILES = (ADAPTER_FILE, MANIFEST_FILE, MIXTURE_FILE, TASKS_FILE, RESULT_FILE)
