{{/* The chart's name. */}}
{{- define "fediversity.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* A release-qualified name. */}}
{{- define "fediversity.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "fediversity.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fediversity.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Labels that select the controller's pod. */}}
{{- define "fediversity.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fediversity.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The service account's name. */}}
{{- define "fediversity.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fediversity.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the Proxmox credentials. */}}
{{- define "fediversity.proxmoxSecret" -}}
{{- default (printf "%s-proxmox" (include "fediversity.fullname" .)) .Values.proxmox.existingSecret -}}
{{- end -}}
