"""The medforge.io API's vocabulary: phases, condition types, reasons and input states, as the
CRDs and status use them (cluster-api keeps its reasons as documented constants the same way).
Every status writer and reader uses these; a unit test checks them against the CRDs' enums.
StrEnum members are plain strings on the wire."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    """How the trainer's and merger's Jobs end; the operator tells a verdict from a fault by it."""

    OK = 0
    FAILED = 1  # a failure nothing else explains (the message says what)
    BAD_CONFIG = 2  # the job config cannot be used (the message names the field)
    VERDICT = 3  # the merger refused every input: a verdict on each, never retried
    STORE_FAULT = 4  # the store could not be reached: retried, blamed on no input


class ContributionPhase(StrEnum):
    PENDING = "Pending"
    TRAINING = "Training"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class CompositePhase(StrEnum):
    WAITING = "Waiting"
    MERGING = "Merging"
    EVALUATING = "Evaluating"  # a candidate is scored at the sites (EvaluationSets)
    READY = "Ready"
    PAUSED = "Paused"
    FAILED = "Failed"


class BaseModelPhase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    FAILED = "Failed"


class ConditionType(StrEnum):
    # kstatus (Flux, kpt, Argo CD read these three)
    READY = "Ready"
    RECONCILING = "Reconciling"
    STALLED = "Stalled"
    # LoRAContribution
    TRAINED = "Trained"
    ARTIFACT_VERIFIED = "ArtifactVerified"
    # CompositeModel
    MERGED = "Merged"
    ACCEPTED = "Accepted"
    # BaseModel
    VERIFIED = "Verified"


class Reason(StrEnum):
    """Condition reasons the operator writes (a failed Job's reason, such as
    BackoffLimitExceeded or DeadlineExceeded, is the Job controller's and passes through)."""

    # Waiting on something outside the object; retried.
    STORE_UNREACHABLE = "StoreUnreachable"  # the forge store did not answer
    NAMESPACE_NOT_MANAGED = "NamespaceNotManaged"  # not a member namespace: no Job is made
    BASE_MODEL_NOT_FOUND = "BaseModelNotFound"  # spec.baseModel.name names no BaseModel
    BASE_MODEL_NOT_READY = "BaseModelNotReady"  # the BaseModel is not verified (yet)
    BASE_MODEL_DIGEST_MISMATCH = "BaseModelDigestMismatch"  # spec.baseModel.digest pins another
    INVALID_SPEC = "InvalidSpec"  # the spec cannot become a Job (the message names the field)
    NOT_A_FORGE_NAMESPACE = "NotAForgeNamespace"  # composite outside MEDFORGE_FORGE_NAMESPACES
    # A contribution's way.
    CREATING_JOB = "CreatingJob"
    JOB_CREATED = "JobCreated"  # waiting for a node, or for Kueue to admit it
    TRAINING = "Training"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"  # a Secret or key is missing
    JOB_FAILED = "JobFailed"
    JOB_COMPLETE = "JobComplete"
    VERIFYING = "Verifying"
    NO_RESULT = "NoResult"  # the Job succeeded without a result JSON
    JOB_NAME_TAKEN = "JobNameTaken"  # a Job of that name exists that MedForge did not make
    # A Job of that name claims to be ours, but its uid is not the one recorded: deleted and
    # made again (a look-alike, or ours from a round cut short before its status was written).
    JOB_NOT_RECORDED = "JobNotRecorded"
    SIGNING_REFUSED = "SigningRefused"  # a plan asked for a URL outside its Job's grant
    INVALID_RESULT = "InvalidResult"  # the result file does not match its digest, or is no result
    DIGEST_MISMATCH = "DigestMismatch"  # uploaded bytes differ from what was reported
    INVALID_MANIFEST = "InvalidManifest"  # the manifest is malformed (types, names, sizes)
    BASE_MODEL_MISMATCH = "BaseModelMismatch"  # trained for another base model
    VERIFIED = "Verified"
    DIGESTS_MATCH = "DigestsMatch"
    DONE = "Done"
    NOT_YET = "NotYet"
    # A composite's way.
    WAITING_FOR_CONTRIBUTIONS = "WaitingForContributions"
    MERGING = "Merging"
    SERVING = "Serving"  # a revision is served while the next one merges
    PAUSED = "Paused"
    REVISION_READY = "RevisionReady"
    IDLE = "Idle"
    NO_REVISION_YET = "NoRevisionYet"
    REVISION_ACCEPTED = "RevisionAccepted"
    REGRESSION_OVER_GATE = "RegressionOverGate"  # a task regressed beyond spec.gate
    MERGE_FAILED = "MergeFailed"
    NO_USABLE_INPUT = "NoUsableInput"  # the merger refused every input: a verdict on each
    # The sites (EvaluationSets) score a candidate on their own images (spec.gate.sites).
    EVALUATING = "Evaluating"
    SITE_REGRESSION = "SiteRegression"  # a site's own images regressed beyond gate.sites
    QUORUM_NOT_REACHED = "QuorumNotReached"  # too few sites reported by gate.sites.timeout
    # A revision failed twice (or was rejected with several new inputs): its new inputs are
    # tried in halves until the one that causes it is found; the others merge meanwhile.
    ISOLATING = "Isolating"
    # An input left (deleted, or consent withdrawn): the revisions that hold it are no longer
    # served, and a replacement without it merges (status.rebuild).
    WITHDRAWING = "Withdrawing"
    # Differential privacy (spec.privacy, PrivacyBudget): refused at admission, no Job made.
    PRIVACY_REQUIRED = "PrivacyRequired"  # the dataset is under a budget: spec.privacy needed
    PRIVACY_BUDGET_EXCEEDED = "PrivacyBudgetExceeded"  # the budget has not that much left
    # spec.startFrom: the revision a contribution trains from (no Job is made until it fits).
    PARENT_NOT_FOUND = "ParentNotFound"  # no such composite or revision (yet): checked again
    PARENT_NOT_PUBLISHED = "ParentNotPublished"  # spec.publish does not reach this namespace
    PARENT_NOT_CONSENTED = "ParentNotConsented"  # an input did not set spec.sharing.publish
    PARENT_NOT_ACCEPTED = "ParentNotAccepted"  # the revision was rejected, failed or withdrawn
    PARENT_IS_MIXTURE = "ParentIsMixture"  # an output-level mixture is no model to train on
    # A BaseModel's way.
    NOT_UPLOADED = "NotUploaded"
    VERIFICATION_FAILED = "VerificationFailed"
    NOT_VERIFIED_YET = "NotVerifiedYet"


class RevisionState(StrEnum):
    """How a merge revision ended (status.history[].state)."""

    ACCEPTED = "Accepted"
    REJECTED = "Rejected"
    FAILED = "Failed"
    # It held an input that was withdrawn: never served or made current again.
    WITHDRAWN = "Withdrawn"


class WithdrawalReason(StrEnum):
    """Why an input left a composite (status.withdrawals[].reason, history[].withdrawnReason)."""

    CONTRIBUTION_DELETED = "ContributionDeleted"
    CONSENT_WITHDRAWN = "ConsentWithdrawn"  # spec.sharing.forges no longer names the composite
    NO_LONGER_SELECTED = "NoLongerSelected"  # the composite's selectors no longer match it


class InputState(StrEnum):
    """What became of a contribution in a composite (status.inputs[].state)."""

    INCLUDED = "Included"
    EXCLUDED = "Excluded"
    PENDING = "Pending"


class InputReason(StrEnum):
    """Why (status.inputs[].reason): codes only, never another hospital's text."""

    MERGED = "Merged"
    QUEUED = "Queued"
    MERGING = "Merging"
    NOT_READY = "NotReady"
    BASE_MODEL_NOT_READY = "BaseModelNotReady"
    TRAINING_FAILED = "TrainingFailed"
    BASE_MODEL_MISMATCH = "BaseModelMismatch"
    REJECTED_BY_GATE = "RejectedByGate"
    MERGE_FAILED = "MergeFailed"
    NO_USABLE_INPUT = "NoUsableInput"  # the merger refused every input: a verdict on each
    EXCLUDED_BY_MERGER = "ExcludedByMerger"
    # Every merge with it failed, alone too, while merges without it succeeded.
    ISOLATED_AFTER_FAILURES = "IsolatedAfterFailures"
    # spec.privacy.maxEpsilon: the granted epsilon is missing or above it.
    PRIVACY_BUDGET_TOO_LARGE = "PrivacyBudgetTooLarge"
    # spec.requireSignatures: no signature, one that does not hold, or a signer that is not an
    # Active key of the namespace's Institution (medforge_common.attestation.Reason).
    UNSIGNED = "Unsigned"
    SIGNATURE_INVALID = "SignatureInvalid"
    UNKNOWN_SIGNER = "UnknownSigner"
    # spec.startFrom: merged relative to its parent revision, in that composite only.
    PARENT_ELSEWHERE = "ParentElsewhere"  # it started from another composite's revision
    PARENT_TOO_STALE = "ParentTooStale"  # older than spec.branches.maxStaleness allows
    PARENT_IS_MIXTURE = "ParentIsMixture"  # this composite is a mixture
    # Its parent revision held an input since withdrawn (spec.withdrawal.cascade).
    PARENT_WITHDRAWN = "ParentWithdrawn"


class EventReason(StrEnum):
    """Reasons of Events that are not a condition's reason."""

    RETIRED_JOB = "RetiredJob"
    REVISION_STARTED = "RevisionStarted"
    EXCLUDED_BY_MERGER = "ExcludedByMerger"
    ISOLATED_AFTER_FAILURES = "IsolatedAfterFailures"
    WITHDRAWN = "Withdrawn"  # the forge saw an input leave (on the composite and the contribution)
    REVISION_CANCELLED = "RevisionCancelled"  # a merge that read a withdrawn input was stopped
    ERASED = "Erased"  # a withdrawal's files were deleted from the store (the receipt's key)
    REVISION_EVALUATING = "RevisionEvaluating"  # a candidate went to the sites' EvaluationSets
    SITE_REGRESSION = "SiteRegression"  # on a set, in its namespace: its images regressed
    # On a set: some of its files have the name and size of files the hospital trained on.
    TRAINING_OVERLAP = "TrainingOverlap"
    # On a contribution trained from a revision that held a withdrawn input: train again.
    PARENT_WITHDRAWN = "ParentWithdrawn"
