"""The MedForge operator: LoRAContributions become training Jobs, CompositeModels become merge
revisions. Handlers (handlers.py) stay thin; manifests and status are pure functions."""

GROUP = "medforge.io"
VERSION = "v1alpha1"
CONTRIBUTIONS = "loracontributions"
COMPOSITES = "compositemodels"
BASEMODELS = "basemodels"
PRIVACYBUDGETS = "privacybudgets"
EVALUATIONSETS = "evaluationsets"
INSTITUTIONS = "institutions"
