{{- define "medforge.name" -}}{{ default "medforge-operator" .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}{{- end -}}
{{- define "medforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "medforge.name" .) .Values.serviceAccount.name }}
{{- else -}}{{ required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}
{{- define "medforge.labels" -}}
app.kubernetes.io/name: medforge
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}
{{- define "medforge.selector" -}}
app.kubernetes.io/name: medforge
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{/* The permissions the operator needs, and nothing more: it never reads Secrets; it creates
and patches the config Secrets of its Jobs (the admission policy holds it to its own). */}}
{{- define "medforge.rules" -}}
- apiGroups: [medforge.io]
  resources: [loracontributions, compositemodels]
  verbs: [get, list, watch]
- apiGroups: [medforge.io]
  resources: [loracontributions/status, compositemodels/status]
  verbs: [get, patch, update]
# The hospitals' evaluation sets: read, and what each candidate scored written to their status.
- apiGroups: [medforge.io]
  resources: [evaluationsets]
  verbs: [get, list, watch]
- apiGroups: [medforge.io]
  resources: [evaluationsets/status]
  verbs: [get, patch, update]
# The privacy ledger: budgets are read, their status (the reservations) written.
- apiGroups: [medforge.io]
  resources: [privacybudgets]
  verbs: [get, list, watch]
- apiGroups: [medforge.io]
  resources: [privacybudgets/status]
  verbs: [get, patch, update]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
