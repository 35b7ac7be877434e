{{- define "crmguard.name" -}}crmguard{{- end -}}
{{- define "crmguard.fullname" -}}{{ printf "%s" .Release.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "crmguard.labels" -}}
app.kubernetes.io/name: crmguard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "crmguard.selector" -}}
app.kubernetes.io/name: crmguard
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
{{- define "crmguard.image" -}}{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}{{- end -}}
