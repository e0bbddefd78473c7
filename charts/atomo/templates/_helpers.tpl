{{/* Every name and label of the chart lives here. */}}

{{- define "atomo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name, short enough for "-workers-<group>-<ordinal>" pod names. */}}
{{- define "atomo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "atomo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "atomo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atomo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "atomo.labels" -}}
helm.sh/chart: {{ include "atomo.chart" . }}
{{ include "atomo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: atomo
{{- end }}

{{/* Labels of one role: (dict "root" $ "component" "ps"). */}}
{{- define "atomo.componentLabels" -}}
{{ include "atomo.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "atomo.componentSelectorLabels" -}}
{{ include "atomo.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "atomo.control.fullname" -}}{{ include "atomo.fullname" . }}-control{{- end }}
{{- define "atomo.ps.fullname" -}}{{ include "atomo.fullname" . }}-ps{{- end }}
{{- define "atomo.workers.fullname" -}}{{ include "atomo.fullname" . }}-workers{{- end }}
{{- define "atomo.tokenSecretName" -}}
{{- default (printf "%s-token" (include "atomo.fullname" .)) .Values.auth.existingSecret }}
{{- end }}
{{- define "atomo.curveSecretName" -}}
{{- default (printf "%s-curve" (include "atomo.fullname" .)) .Values.curve.existingSecret }}
{{- end }}
{{- define "atomo.keygenName" -}}{{ include "atomo.fullname" . }}-keygen{{- end }}

{{- define "atomo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "atomo.control.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The ServiceAccount of the PS or of a worker group (cloud identity: its annotations bind it to a cloud role):
(dict "account" .Values.ps.serviceAccount "fullname" "atomo-ps"). Empty: the pod keeps the namespace's default.
*/}}
{{- define "atomo.roleServiceAccountName" -}}
{{- if .account.create }}
{{- default .fullname .account.name }}
{{- else }}
{{- .account.name }}
{{- end }}
{{- end }}

{{/* Scheduling on a shared cluster: a role's own key, else the scheduling: default. (dict "root" $ "role" $ps) */}}
{{- define "atomo.priorityClassName" -}}
{{- .role.priorityClassName | default .root.Values.scheduling.priorityClassName }}
{{- end }}

{{/*
priorityClassName, schedulerName and topologySpreadConstraints of a pod spec; a constraint without a
labelSelector gets the pods' own selector labels (its role's, and its worker group's).
(dict "root" $ "role" $w "selector" (dict ...labels)).
*/}}
{{- define "atomo.scheduling" -}}
{{- with (include "atomo.priorityClassName" .) }}
priorityClassName: {{ . }}
{{- end }}
{{- with (.role.schedulerName | default .root.Values.scheduling.schedulerName) }}
schedulerName: {{ . }}
{{- end }}
{{- if .role.topologySpreadConstraints }}
{{- $out := list }}
{{- range .role.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not (hasKey $constraint "labelSelector") }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" $.selector) }}
{{- end }}
{{- $out = append $out $constraint }}
{{- end }}
topologySpreadConstraints: {{- toYaml $out | nindent 2 }}
{{- end }}
{{- end }}

{{/* The PS endpoints as the workers and the control service reach them. */}}
{{- define "atomo.ps.dataEndpoint" -}}
tcp://{{ include "atomo.ps.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.ps.ports.data }}
{{- end }}
{{- define "atomo.ps.controlEndpoint" -}}
tcp://{{ include "atomo.ps.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.ps.ports.control }}
{{- end }}

{{/*
Every enabled worker group as a list of dicts {name, fullname, values}: the main `workers:` group first,
then each enabled additionalWorkerGroups entry (sorted by name) with its keys over the workers: block (maps
merged, except the placement keys below, which a group replaces).
Returned as YAML; read it with `include "atomo.workerGroups" . | fromYaml`.
*/}}
{{- define "atomo.workerGroups" -}}
groups:
  - name: ""
    fullname: {{ include "atomo.workers.fullname" . }}
    values: {{- toYaml .Values.workers | nindent 6 }}
{{- range $name := keys .Values.additionalWorkerGroups | sortAlpha }}
{{- $group := get $.Values.additionalWorkerGroups $name }}
{{- if not $group.disabled }}
{{- $values := mergeOverwrite (deepCopy $.Values.workers) (omit $group "disabled") }}
{{- /* Where to run is replaced as a whole, never merged: a group's nodeSelector, affinity, tolerations and
topologySpreadConstraints (even empty ones) stand alone. */}}
{{- range $key := list "nodeSelector" "affinity" "tolerations" "topologySpreadConstraints" }}
{{- if hasKey $group $key }}
{{- $_ := set $values $key (get $group $key) }}
{{- end }}
{{- end }}
  - name: {{ $name }}
    fullname: {{ include "atomo.workers.fullname" $ }}-{{ $name }}
    values: {{- toYaml $values | nindent 6 }}
{{- end }}
{{- end }}
{{- end }}

{{/* The image of a role: (dict "root" $ "role" .Values.ps). */}}
{{- define "atomo.image" -}}
{{- $image := mergeOverwrite (deepCopy .root.Values.image) (.role.image | default dict) }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "atomo.imagePullPolicy" -}}
{{- $image := mergeOverwrite (deepCopy .root.Values.image) (.role.image | default dict) }}
{{- $image.pullPolicy }}
{{- end }}

{{/* Pod-level settings every role shares: (dict "root" $ "role" .Values.ps). */}}
{{- define "atomo.podSecurity" -}}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
securityContext: {{- toYaml (.role.podSecurityContext | default .root.Values.podSecurityContext) | nindent 2 }}
{{- with .role.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .role.affinity }}
affinity: {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "atomo.containerSecurityContext" -}}
{{- toYaml (.role.securityContext | default .root.Values.securityContext) }}
{{- end }}

{{/*
Environment every role shares: torch and OpenMP threads from the container's own CPU limit (the downward API
rounds a fractional limit up to whole CPUs), HOME and caches on the writable /tmp. (dict "container" NAME).
*/}}
{{- define "atomo.commonEnv" -}}
- name: ATOMO_THREADS
  valueFrom:
    resourceFieldRef:
      containerName: {{ .container }}
      resource: limits.cpu
      divisor: "1"
- name: OMP_NUM_THREADS
  valueFrom:
    resourceFieldRef:
      containerName: {{ .container }}
      resource: limits.cpu
      divisor: "1"
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end }}

{{/* Prometheus scrape annotations: (dict "port" 9090 "path" "/metrics"). */}}
{{- define "atomo.scrapeAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: {{ .path | default "/metrics" | quote }}
{{- end }}

{{/*
The CURVE key volume of a role, laid out as `atomo keys` writes it (services.common.transport.CurveKeys):
the PS gets its pair and the clients' public keys; a client gets its own pair and the server's public key
(never the server's secret key).
(dict "root" $ "role" "ps"|"worker"|"control").
*/}}
{{- define "atomo.curveVolume" -}}
{{- $v := .root.Values.curve }}
- name: curve-keys
  secret:
    secretName: {{ include "atomo.curveSecretName" .root }}
    defaultMode: 0440
    items:
      {{- if eq .role "ps" }}
      - {key: server.key, path: server.key}
      - {key: server.key_secret, path: server.key_secret}
      - {key: {{ $v.workerClient }}.key, path: clients/{{ $v.workerClient }}.key}
      - {key: {{ $v.controlClient }}.key, path: clients/{{ $v.controlClient }}.key}
      {{- else }}
      {{- $client := ternary $v.workerClient $v.controlClient (eq .role "worker") }}
      - {key: server.key, path: server.key}
      - {key: {{ $client }}.key, path: clients/{{ $client }}.key}
      - {key: {{ $client }}.key_secret, path: clients/{{ $client }}.key_secret}
      {{- end }}
{{- end }}
