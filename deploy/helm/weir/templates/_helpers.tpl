{{/* The name of the chart's objects: the release name ("weir" in the
README's install command, matching deploy/kubernetes/base). */}}
{{- define "weir.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: the same as the kustomize base's, so a DaemonSet
installed either way has the same (immutable) selector. */}}
{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: weir
{{- end -}}

{{/* Labels of every object: the kustomize base's, then Helm's own
(deploy/compare-renders.py leaves only these four out when it compares
the two renderings). */}}
{{- define "weir.labels" -}}
{{ include "weir.selectorLabels" . }}
app.kubernetes.io/part-of: weir
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "weir.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The platform preset's CNI directories (host paths). */}}
{{- define "weir.cniConfDir" -}}
{{- if .Values.cni.confDir -}}
{{- .Values.cni.confDir -}}
{{- else if eq .Values.platform "k3s" -}}
/var/lib/rancher/k3s/agent/etc/cni/net.d
{{- else -}}
/etc/cni/net.d
{{- end -}}
{{- end -}}

{{- define "weir.cniBinDir" -}}
{{- if .Values.cni.binDir -}}
{{- .Values.cni.binDir -}}
{{- else if eq .Values.platform "k3s" -}}
/var/lib/rancher/k3s/data/cni
{{- else if eq .Values.platform "gke" -}}
/home/kubernetes/bin
{{- else -}}
/opt/cni/bin
{{- end -}}
{{- end -}}

{{/* --metrics-addr: IP:PORT, an IPv6 address in brackets. The probes
reach it on the node's address, so a loopback address cannot work. */}}
{{- define "weir.metricsAddr" -}}
{{- $a := .Values.metrics.address -}}
{{- if or (hasPrefix "127." $a) (eq $a "::1") (eq $a "localhost") -}}
{{- fail (printf "metrics.address %q: the kubelet's probes and Prometheus reach the agent on the node's address; use 0.0.0.0, :: or the node's address" $a) -}}
{{- end -}}
{{- if contains ":" $a -}}
{{- printf "[%s]:%d" $a (int .Values.metrics.port) -}}
{{- else -}}
{{- printf "%s:%d" $a (int .Values.metrics.port) -}}
{{- end -}}
{{- end -}}

{{- define "weir.monitorInterval" -}}
{{- with .interval }}
interval: {{ . }}
{{- end }}
{{- with .scrapeTimeout }}
scrapeTimeout: {{ . }}
{{- end }}
{{- end -}}
