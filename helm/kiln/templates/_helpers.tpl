{{/* Names, labels and the addresses every component shares. */}}

{{- define "kiln.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-kiln", or the release name when it already says kiln. */}}
{{- define "kiln.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "kiln.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "kiln.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kiln
{{ include "kiln.selectorLabels" . }}
{{- end -}}

{{/* Labels that select one component's pods. */}}
{{- define "kiln.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiln.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kiln.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* GPU workers run the CUDA image; CPU workers the CPU one. */}}
{{- define "kiln.workerImage" -}}
{{- if .Values.worker.gpu.enabled -}}
{{- printf "%s:%s" .Values.worker.image.repository (default (printf "%s-cuda" .Chart.AppVersion) .Values.worker.image.tag) -}}
{{- else -}}
{{- include "kiln.image" . -}}
{{- end -}}
{{- end -}}

{{- define "kiln.etcdEndpoints" -}}
{{- if .Values.etcd.bundled -}}
{{- printf "http://%s-etcd:2379" (include "kiln.fullname" .) -}}
{{- else -}}
{{- required "etcd.external.endpoints is required when etcd.bundled is false" .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{- define "kiln.pepperSecretName" -}}
{{- default (printf "%s-api-key-pepper" (include "kiln.fullname" .)) .Values.apiKeyPepper.existingSecret -}}
{{- end -}}

{{- define "kiln.pepperSecretKey" -}}
{{- if .Values.apiKeyPepper.existingSecret -}}{{ .Values.apiKeyPepper.existingSecretKey }}{{- else -}}pepper{{- end -}}
{{- end -}}

{{- define "kiln.c2paEnabled" -}}
{{- if or .Values.c2pa.existingSecret (and .Values.c2pa.certChain .Values.c2pa.privateKey) -}}true{{- end -}}
{{- end -}}

{{- define "kiln.c2paSecretName" -}}
{{- default (printf "%s-c2pa" (include "kiln.fullname" .)) .Values.c2pa.existingSecret -}}
{{- end -}}

{{/* Environment shared by every Kiln container: logs, traces, etcd, and the Redis URL. */}}
{{- define "kiln.commonEnv" -}}
- name: KILN_LOG_FORMAT
  value: json
- name: KILN_LOG
  value: {{ .Values.logLevel | quote }}
{{- if .Values.tracing.otlpEndpoint }}
- name: KILN_TRACE_OTLP_ENDPOINT
  value: {{ .Values.tracing.otlpEndpoint | quote }}
{{- end }}
{{- end -}}

{{/* The Redis URL as an env var of the given name; call with (dict "ctx" $ "name" "KILN_GATEWAY_REDIS"). */}}
{{- define "kiln.redisEnv" -}}
- name: {{ .name }}
{{- if .ctx.Values.redis.bundled }}
  value: {{ printf "redis://%s-redis:6379/" (include "kiln.fullname" .ctx) | quote }}
{{- else if .ctx.Values.redis.external.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ .ctx.Values.redis.external.existingSecret }}
      key: {{ .ctx.Values.redis.external.existingSecretKey }}
{{- else }}
  value: {{ required "redis.external.url or redis.external.existingSecret is required when redis.bundled is false" .ctx.Values.redis.external.url | quote }}
{{- end }}
{{- end -}}

{{- define "kiln.pepperEnv" -}}
- name: KILN_API_KEY_PEPPER
  valueFrom:
    secretKeyRef:
      name: {{ include "kiln.pepperSecretName" . }}
      key: {{ include "kiln.pepperSecretKey" . }}
{{- end -}}

{{/* Probes on the standard grpc.health.v1 service of a component's gRPC port. */}}
{{- define "kiln.grpcProbes" -}}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  failureThreshold: 6
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 2
  failureThreshold: {{ .startupFailures | default 30 }}
{{- end -}}
