// Command kstatus-check reads Kubernetes objects (a JSON list or a List object) on standard
// input and prints, for each, the status that sigs.k8s.io/cli-utils/pkg/kstatus computes: the
// verdict Flux's `wait: true`, kpt and other GitOps tools act on.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kjson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace"`
	Name      string `json:"name"`
	Status    string `json:"status"`
	Message   string `json:"message"`
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading standard input: %v", err)
	}
	var objects []map[string]interface{}
	// Kubernetes' decoder: whole numbers become int64, as unstructured objects expect.
	if err := kjson.Unmarshal(raw, &objects); err != nil {
		var list struct {
			Items []map[string]interface{} `json:"items"`
		}
		if err2 := kjson.Unmarshal(raw, &list); err2 != nil {
			fail("standard input is neither a JSON array nor a List: %v", err)
		}
		objects = list.Items
	}
	out := make([]verdict, 0, len(objects))
	for _, o := range objects {
		u := &unstructured.Unstructured{Object: o}
		res, err := status.Compute(u)
		if err != nil {
			fail("%s %s/%s: %v", u.GetKind(), u.GetNamespace(), u.GetName(), err)
		}
		out = append(out, verdict{u.GetKind(), u.GetNamespace(), u.GetName(), res.Status.String(), res.Message})
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	if err := enc.Encode(out); err != nil {
		fail("writing the result: %v", err)
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "kstatus-check: "+format+"\n", args...)
	os.Exit(2)
}
