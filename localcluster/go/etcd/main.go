// Command etcd runs etcd's own entry point; the wrapper exists only so that
// etcd can be built from its Go module without cloning the repository.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
