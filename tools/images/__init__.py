"""`make images`: the operator, trainer and merger as OCI images, built without a container
engine from a Debian root filesystem (mmdebstrap) and locked wheels, reproducibly."""
