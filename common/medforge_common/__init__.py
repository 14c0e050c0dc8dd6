"""The contract shared by the operator, the trainer and the merger.

Standard library only, so that every image can install it: storage URIs, the artifact manifest
(with the sha256 of every file) and the result each Job writes to its termination-message path.
"""
