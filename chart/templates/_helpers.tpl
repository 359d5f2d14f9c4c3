{{/* Names, labels and the two rendered config files. */}}

{{- define "speculum.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "speculum.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "speculum.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "speculum.labels" -}}
helm.sh/chart: {{ include "speculum.chart" . }}
app.kubernetes.io/name: {{ include "speculum.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "daemon"). */}}
{{- define "speculum.selectorLabels" -}}
app.kubernetes.io/name: {{ include "speculum.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "speculum.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "speculum.webhookImage" -}}
{{- $repo := default .Values.image.repository .Values.webhook.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.webhook.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "speculum.daemonServiceAccount" -}}
{{- default (printf "%s-daemon" (include "speculum.fullname" .)) .Values.daemon.serviceAccount.name }}
{{- end }}

{{- define "speculum.webhookServiceAccount" -}}
{{- default (printf "%s-webhook" (include "speculum.fullname" .)) .Values.webhook.serviceAccount.name }}
{{- end }}

{{- define "speculum.webhookName" -}}
{{- printf "%s-webhook" (include "speculum.fullname" .) }}
{{- end }}

{{- define "speculum.pskSecret" -}}
{{- default (printf "%s-psk" (include "speculum.fullname" .)) .Values.routing.psk.existingSecret }}
{{- end }}

{{- define "speculum.grantKeySecret" -}}
{{- default (printf "%s-grant-key" (include "speculum.fullname" .)) .Values.webhook.grants.existingSecret }}
{{- end }}

{{- define "speculum.peerKeySecret" -}}
{{- default (printf "%s-peer-key" (include "speculum.fullname" .)) .Values.tenancy.peerAuth.sharedKeySecret }}
{{- end }}

{{/* Grants need the webhook (it signs them) and tenancy (the daemons check them). */}}
{{- define "speculum.grantsEnabled" -}}
{{- if and .Values.webhook.enabled .Values.webhook.grants.enabled .Values.tenancy.enabled }}true{{ end }}
{{- end }}

{{/*
The webhook's cluster fallback asks the daemons' peer port, which with kubernetes peer
authentication refuses anonymous requests: the webhook then presents its own projected token
(audience tenancy.peerAuth.audience) and its ServiceAccount is one the daemons accept.
*/}}
{{- define "speculum.webhookPeerToken" -}}
{{- if and .Values.webhook.enabled .Values.webhook.resolver.clusterFallback .Values.tenancy.enabled (eq .Values.tenancy.peerAuth.mode "kubernetes") }}true{{ end }}
{{- end }}

{{/* Container paths (fixed; the host paths come from values). */}}
{{- define "speculum.paths" -}}
config: /etc/speculum/config.yaml
policy: /etc/speculum/policy
psk: /etc/speculum/psk/swarm.key
grantKeys: /etc/speculum/grant-keys
token: /var/run/secrets/speculum/token
sharedKey: /etc/speculum/peer-key/shared.key
webhookConfig: /etc/speculum-webhook/config.yaml
webhookTls: /etc/speculum-webhook/tls
webhookPolicy: /etc/speculum-webhook/admission
grantKey: /etc/speculum-webhook/grant-key/grant.key
{{- end }}

{{/*
The daemon's config file (src/config.rs; keys are the daemon's own, snake_case). Sections of
features that are switched off are left out entirely.
*/}}
{{- define "speculum.daemonConfig" -}}
{{- $p := include "speculum.paths" . | fromYaml }}
{{- $d := .Values.daemon }}
{{- $full := include "speculum.fullname" . }}
{{- $bootstrap := dict "peers" .Values.routing.peers }}
{{- if .Values.routing.bootstrapService }}
{{- $_ := set $bootstrap "dns" (printf "%s-bootstrap.%s.svc.%s:%d" $full .Release.Namespace .Values.clusterDomain (int $d.ports.p2p)) }}
{{- end }}
{{- $routing := dict "listen" (printf "/ip4/0.0.0.0/tcp/%d" (int $d.ports.p2p)) "registry_port" (int $d.ports.peer) "data_dir" $d.dataDir "bootstrap" $bootstrap }}
{{- if .Values.routing.psk.enabled }}
{{- $_ := set $routing "psk_file" $p.psk }}
{{- end }}
{{- $audit := dict "log" $d.audit.log "max_bytes" (int64 $d.audit.maxBytes) "max_files" (int $d.audit.maxFiles) }}
{{- if $d.audit.file }}
{{- $_ := set $audit "file" (printf "%s/%s" (trimSuffix "/" $d.audit.dir) $d.audit.file) }}
{{- end }}
{{- $containerd := dict "socket" .Values.containerd.socket "namespace" .Values.containerd.namespace }}
{{- $crio := eq .Values.runtime "cri-o" }}
{{- if $crio }}
{{- $_ := set $containerd "enabled" false }}
{{- else if .Values.containerd.contentDir }}
{{- $_ := set $containerd "content_dir" .Values.containerd.contentDir }}
{{- end }}
{{- $hosts := dict "certs_dir" .Values.containerd.certsDir "mirrored_registries" $d.mirroredRegistries "mirror_endpoint" (printf "http://127.0.0.1:%d" (int $d.ports.mirror)) "dial_timeout" $d.hostsDialTimeout "prepend_existing" $d.prependExisting }}
{{- if $crio }}
{{- $_ := set $hosts "runtime" "cri-o" }}
{{- $_ := set $hosts "registries_conf_dir" .Values.crio.registriesConfDir }}
{{- /* Without hostPID no pid seen in the pod is CRI-O's: never signal then. */}}
{{- $_ := set $hosts "crio_find_process" .Values.crio.signalReload }}
{{- if and .Values.crio.signalReload .Values.crio.pidFile }}
{{- $_ := set $hosts "crio_pid_file" .Values.crio.pidFile }}
{{- end }}
{{- end }}
{{- $cfg := dict
  "registry" (dict "mirror_listen" (printf "127.0.0.1:%d" (int $d.ports.mirror)) "peer_listen" (printf "0.0.0.0:%d" (int $d.ports.peer)) "drain_grace" $d.drainGrace "peer_serving_limit" (int $d.peerServingLimit))
  "mirror" (dict "resolve_timeout" $d.resolveTimeout "blob_resolve_timeout" $d.blobResolveTimeout "attempts" (int $d.mirrorAttempts) "manifest_deadline" $d.manifestDeadline "tag_resolution" $d.tagResolution "tag_upstream_timeout" $d.tagUpstreamTimeout "chunk_threshold" (int64 $d.chunkThreshold))
  "metrics" (dict "listen" (printf "0.0.0.0:%d" (int $d.ports.metrics)))
  "containerd" $containerd
  "routing" $routing
  "hosts" $hosts
  "policy" (dict "bundle" (ternary $p.policy "" (ne .Values.policy.bundle "")) "resolve_tags" .Values.policy.resolveTags "resolve_latest_tag" .Values.policy.resolveLatestTag "eval_timeout" .Values.policy.evalTimeout "reload_interval" .Values.policy.reloadInterval)
  "audit" $audit
  "status" (dict "enabled" $d.statusPage.enabled "recent" (int $d.statusPage.recentRequests))
  "log" (dict "format" $d.log.format "level" $d.log.level)
}}
{{- if .Values.tenancy.enabled }}
{{- $t := .Values.tenancy }}
{{- $sas := list (printf "%s:%s" .Release.Namespace (include "speculum.daemonServiceAccount" .)) }}
{{- if include "speculum.webhookPeerToken" . }}
{{- $sas = append $sas (printf "%s:%s" .Release.Namespace (include "speculum.webhookServiceAccount" .)) }}
{{- end }}
{{- $sas = concat $sas $t.peerAuth.extraServiceAccounts }}
{{- $peer := dict "mode" $t.peerAuth.mode }}
{{- if eq $t.peerAuth.mode "kubernetes" }}
{{- $_ := set $peer "token_file" $p.token }}
{{- $_ := set $peer "audience" $t.peerAuth.audience }}
{{- $_ := set $peer "service_accounts" $sas }}
{{- else if eq $t.peerAuth.mode "shared_key" }}
{{- $_ := set $peer "shared_key_file" $p.sharedKey }}
{{- end }}
{{- $_ := set $cfg "tenancy" (dict "pods" (dict "source" "kubernetes") "grants" (dict "keys_dir" $p.grantKeys "audience" $t.grants.audience) "peer_auth" $peer) }}
{{- end }}
{{- if .Values.cache.enabled }}
{{- $_ := set $cfg "cache" (dict "enabled" true "dir" .Values.cache.dir "max_bytes" (int64 .Values.cache.maxBytes) "upstream_fetch" .Values.cache.upstreamFetch) }}
{{- end }}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy .Values.daemon.extraConfig) }}
{{- toYaml $cfg }}
{{- end }}

{{/* The webhook's config file (webhook/src/config.rs; camelCase keys). */}}
{{- define "speculum.webhookConfig" -}}
{{- $p := include "speculum.paths" . | fromYaml }}
{{- $w := .Values.webhook }}
{{- $full := include "speculum.fullname" . }}
{{- $tls := dict "mode" $w.tls.mode "checkInterval" $w.tls.checkInterval }}
{{- if eq $w.tls.mode "files" }}
{{- $_ := set $tls "certFile" (printf "%s/tls.crt" $p.webhookTls) }}
{{- $_ := set $tls "keyFile" (printf "%s/tls.key" $p.webhookTls) }}
{{- end }}
{{- $endpoints := list }}
{{- if and $w.resolver.clusterFallback $w.resolver.clusterEndpoints }}
{{- $endpoints = $w.resolver.clusterEndpoints }}
{{- else if $w.resolver.clusterFallback }}
{{- $endpoints = list (printf "%s-registry.%s.svc:%d" $full .Release.Namespace (int .Values.daemon.ports.peer)) }}
{{- end }}
{{- $policy := dict "skipPrefixes" $w.policy.skipPrefixes "strictNamespaces" $w.policy.strictNamespaces }}
{{- if $w.policy.rego }}
{{- $_ := set $policy "regoFile" (printf "%s/admission.rego" $p.webhookPolicy) }}
{{- end }}
{{- $cfg := dict
  "listen" (printf "0.0.0.0:%d" (int $w.ports.https))
  "metricsListen" (printf "0.0.0.0:%d" (int $w.ports.metrics))
  "admissionDeadline" $w.admissionDeadline
  "shutdownGrace" $w.shutdownGrace
  "tls" $tls
  "webhook" (dict "configurationName" (include "speculum.webhookName" .) "serviceName" (include "speculum.webhookName" .) "serviceNamespace" .Release.Namespace "servicePort" 443 "secretName" (printf "%s-tls" (include "speculum.webhookName" .)) "failurePolicy" $w.failurePolicy "timeoutSeconds" (int $w.timeoutSeconds) "optInLabel" $w.optInLabel "optOutLabel" $w.optOutLabel "certValidity" $w.tls.certValidity "rotateBefore" $w.tls.rotateBefore)
  "resolver" (dict "timeout" $w.resolver.timeout "cacheTtl" $w.resolver.cacheTtl "cacheCapacity" (int $w.resolver.cacheCapacity) "registries" $w.resolver.registries "clusterEndpoints" $endpoints)
  "policy" $policy
}}
{{- if include "speculum.webhookPeerToken" . }}
{{- $_ := set $cfg.resolver "clusterTokenFile" $p.token }}
{{- end }}
{{- if include "speculum.grantsEnabled" . }}
{{- $_ := set $cfg "grants" (dict "signingKeyFile" $p.grantKey "ttl" $w.grants.ttl "audience" .Values.tenancy.grants.audience "mirrorPolicyDir" $p.policy "publishConfigMap" (printf "%s/%s-grant-keys" .Release.Namespace $full)) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Fails the render on settings that cannot work together. */}}
{{- define "speculum.validate" -}}
{{- $b := .Values.policy.bundle }}
{{- if and $b (not (hasKey .Values.policy.bundles $b)) (not (.Files.Glob (printf "files/policies/%s/*.rego" $b))) }}
{{- fail (printf "policy.bundle %q is neither a chart bundle (files/policies/) nor a key of policy.bundles" $b) }}
{{- end }}
{{- if and .Values.webhook.enabled (eq .Values.webhook.tls.mode "files") (not .Values.webhook.tls.certSecret) }}
{{- fail "webhook.tls.mode files needs webhook.tls.certSecret" }}
{{- end }}
{{- end }}

{{/*
The daemon runs as root (the containerd socket and content store are root's; hosts.toml
files are written as root) but with no capabilities at all: owner permissions suffice.
*/}}
{{- define "speculum.daemonSecurityContext" -}}
runAsUser: 0
runAsNonRoot: false
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "speculum.webhookSecurityContext" -}}
runAsUser: 65532
runAsGroup: 65532
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
