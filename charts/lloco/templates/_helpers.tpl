{{/*
Names, labels and the pieces every Ray cluster of this chart shares. The RayService, the jobs cluster and
every RayJob build their cluster from "lloco.rayClusterSpec", whose head and worker groups all come from
the one pod template "lloco.rayPodTemplate".

What a pod spec holds never depends on the platform's settings: those reach the processes through the
settings file (a ConfigMap every Ray pod mounts, `LLOCO_CONFIG`) and the Serve application's args. So a
`helm upgrade` that changes only settings (limits, engine, LoRA slots, jobs, model) leaves the RayService's
rayClusterConfig alone, and KubeRay applies it to the running cluster instead of building a new one.
*/}}

{{- define "lloco.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name, cut to 63 characters (a DNS label). */}}
{{- define "lloco.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A name for a resource of the release: "<fullname>-<suffix>", the fullname cut so the whole name stays
within `max` characters (KubeRay appends its own suffixes to RayService, RayCluster and RayJob names).
*/}}
{{- define "lloco.resourceName" -}}
{{- $max := default 63 .max }}
{{- $base := include "lloco.fullname" .root | trunc (int (sub $max (add1 (len .suffix)))) | trimSuffix "-" }}
{{- printf "%s-%s" $base .suffix }}
{{- end }}

{{- define "lloco.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lloco.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lloco.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lloco.labels" -}}
helm.sh/chart: {{ include "lloco.chart" . }}
{{ include "lloco.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lloco
{{- end }}

{{- define "lloco.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lloco.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image, pinned by digest when one is given. */}}
{{- define "lloco.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "lloco.adminSecretName" -}}
{{- default (include "lloco.resourceName" (dict "root" . "suffix" "admin")) .Values.adminKey.existingSecret }}
{{- end }}

{{/* The RayService; KubeRay names its head Service "<this>-head-svc" and keeps it on the serving cluster. */}}
{{- define "lloco.rayServiceName" -}}
{{- include "lloco.resourceName" (dict "root" . "suffix" "serve" "max" 40) }}
{{- end }}

{{/* The jobs cluster (a RayCluster: at most 53 characters, KubeRay adds "-head-svc" and pod suffixes). */}}
{{- define "lloco.jobsClusterName" -}}
{{- include "lloco.resourceName" (dict "root" . "suffix" "jobs" "max" 40) }}
{{- end }}

{{/* The job server of the jobs cluster, as the platform's setting `jobs.ray_address`. */}}
{{- define "lloco.jobsClusterAddress" -}}
{{- printf "http://%s-head-svc.%s.svc.%s:8265" (include "lloco.jobsClusterName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "lloco.settingsConfigMapName" -}}
{{- include "lloco.resourceName" (dict "root" . "suffix" "settings") }}
{{- end }}

{{/* Where every Ray pod mounts the settings ConfigMap (a folder, so the kubelet refreshes it in place). */}}
{{- define "lloco.settingsDir" -}}
/etc/lloco/config
{{- end }}

{{/*
The name of a job's RayJob or RayCronJob. KubeRay derives cluster and pod names from it, and a
RayCronJob's child RayJobs add a suffix: 40 and 30 characters leave room for both.
Args: root, job, values.
*/}}
{{- define "lloco.jobName" -}}
{{- include "lloco.resourceName" (dict "root" .root "suffix" .job "max" (ternary 30 40 (not (empty .values.schedule)))) }}
{{- end }}

{{/* Where the serving pods mount the API's TLS secret (gRPC and HTTP). */}}
{{- define "lloco.tlsDir" -}}
/etc/lloco/tls
{{- end }}

{{/* The Ray custom resource only the serving cluster's head has: the Ingress replicas (the gRPC edge) need it. */}}
{{- define "lloco.edgeResource" -}}
lloco_edge
{{- end }}

{{- define "lloco.grpcServiceName" -}}
{{- include "lloco.resourceName" (dict "root" . "suffix" "grpc") }}
{{- end }}

{{/* The port clients dial on the gRPC Service: an ExternalName alias maps no port. */}}
{{- define "lloco.grpcServicePort" -}}
{{- if eq .Values.serve.service.type "ExternalName" }}
{{- int64 .Values.serve.grpcPort }}
{{- else }}
{{- int64 .Values.serve.service.port }}
{{- end }}
{{- end }}

{{/* The port clients dial for the OpenAI-compatible HTTP API on that Service. */}}
{{- define "lloco.httpServicePort" -}}
{{- if eq .Values.serve.service.type "ExternalName" }}
{{- int64 .Values.serve.httpPort }}
{{- else }}
{{- int64 .Values.serve.service.httpPort }}
{{- end }}
{{- end }}

{{/* A number value as JSON: `--set` leaves decimals as strings ("2e-5"), which the schema admits. */}}
{{- define "lloco.number" -}}
{{- if kindIs "string" . }}{{ float64 . | toJson }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/*
The platform's settings (lloco.config.Settings, snake_case, one mapping per section) rendered from the
values: the content of the settings ConfigMap, and (the serving sections) the Serve application's args.
Secrets are never part of it.
*/}}
{{- define "lloco.settings" -}}
{{- $v := .Values -}}
data_dir: /cache/lloco
store:
  bucket: {{ $v.s3.bucket | quote }}
  prefix: {{ $v.s3.prefix | quote }}
  region: {{ $v.s3.region | quote }}
  {{- with $v.s3.endpointUrl }}
  endpoint_url: {{ . | quote }}
  {{- end }}
model:
  base_model: {{ $v.model.base | quote }}
  compressor: {{ $v.model.compressor | quote }}
  dtype: {{ $v.model.dtype | quote }}
  cache_dir: /cache/lloco/models
limits:
  max_document_bytes: {{ int64 $v.limits.maxDocumentBytes }}
  max_documents: {{ int64 $v.limits.maxDocuments }}
  max_inflight_requests: {{ int64 $v.limits.maxInflightRequests }}
  max_query_tokens: {{ int64 $v.limits.maxQueryTokens }}
  max_new_tokens: {{ int64 $v.limits.maxNewTokens }}
  max_docs_per_query: {{ int64 $v.limits.maxDocsPerQuery }}
  online_compress_max_tokens: {{ int64 $v.limits.onlineCompressMaxTokens }}
  max_page_size: {{ int64 $v.limits.maxPageSize }}
  {{- if $v.limits.maxMessageBytes }}
  max_message_bytes: {{ int64 $v.limits.maxMessageBytes }}
  {{- end }}
  max_names_per_call: {{ int64 $v.limits.maxNamesPerCall }}
  max_retrieval_k: {{ int64 $v.limits.maxRetrievalK }}
  default_retrieval_k: {{ int64 $v.limits.defaultRetrievalK }}
  max_corpus_segments: {{ int64 $v.limits.maxCorpusSegments }}
  tenant_storage_concurrency: {{ int64 $v.limits.tenantStorageConcurrency }}
lora:
  max_rank: {{ int64 $v.lora.maxRank }}
  gpu_slots: {{ int64 $v.lora.gpuSlots }}
  cpu_adapters: {{ int64 $v.lora.cpuAdapters }}
engine:
  max_batch_size: {{ int64 $v.engine.maxBatchSize }}
  max_seq_len: {{ int64 $v.engine.maxSeqLen }}
  context_cache_gpu_bytes: {{ int64 $v.engine.contextCacheGpuBytes }}
  context_cache_cpu_bytes: {{ int64 $v.engine.contextCacheCpuBytes }}
  prefix_cache_bytes: {{ int64 $v.engine.prefixCacheBytes }}
  compile: {{ $v.engine.compile }}
  capture_decode_modes: {{ $v.engine.captureDecodeModes | toJson }}
  prefill_chunk_tokens: {{ if $v.engine.prefillChunkTokens }}{{ int64 $v.engine.prefillChunkTokens }}{{ else }}null{{ end }}
  input_token_cost: {{ include "lloco.number" $v.engine.inputTokenCost }}
  output_token_cost: {{ include "lloco.number" $v.engine.outputTokenCost }}
  fair_preemption: {{ $v.engine.fairPreemption }}
  tenant_weights: {{ $v.engine.tenantWeights | toJson }}
serve:
  host: {{ $v.serve.host | quote }}
  grpc_port: {{ int64 $v.serve.grpcPort }}
  http_port: {{ int64 $v.serve.httpPort }}
  {{- if $v.serve.tls.existingSecret }}
  tls_cert_file: {{ printf "%s/tls.crt" (include "lloco.tlsDir" .) | quote }}
  tls_key_file: {{ printf "%s/tls.key" (include "lloco.tlsDir" .) | quote }}
  {{- end }}
  engine_replicas: {{ max 1 (int64 $v.serve.engine.minReplicas) }}
  engine_num_gpus: {{ include "lloco.number" $v.serve.engine.numGpus }}
  max_ongoing_requests: {{ int64 $v.serve.engine.maxOngoingRequests }}
  stream_messages_per_s: {{ include "lloco.number" $v.serve.engine.streamMessagesPerSecond }}
  auth_cache_ttl_s: {{ include "lloco.number" $v.serve.edgeCache.authTtlSeconds }}
  metadata_cache_ttl_s: {{ include "lloco.number" $v.serve.edgeCache.metadataTtlSeconds }}
  metadata_cache_entries: {{ int64 $v.serve.edgeCache.metadataEntries }}
compress:
  batch_size: {{ int64 $v.jobs.compress.batchSize }}
  pool_size: {{ int64 $v.jobs.compress.poolSize }}
  actor_num_gpus: {{ include "lloco.number" $v.jobs.compress.actorNumGpus }}
  actor_num_cpus: {{ include "lloco.number" $v.jobs.compress.actorNumCpus }}
  max_document_tokens: {{ int64 $v.jobs.compress.maxDocumentTokens }}
finetune:
  rank: {{ int64 $v.jobs.finetune.rank }}
  alpha: {{ include "lloco.number" $v.jobs.finetune.alpha }}
  dropout: {{ include "lloco.number" $v.jobs.finetune.dropout }}
  target_modules: {{ $v.jobs.finetune.targetModules | toJson }}
  learning_rate: {{ include "lloco.number" $v.jobs.finetune.learningRate }}
  epochs: {{ include "lloco.number" $v.jobs.finetune.epochs }}
  batch_size: {{ int64 $v.jobs.finetune.batchSize }}
  grad_accum: {{ int64 $v.jobs.finetune.gradAccum }}
  warmup_ratio: {{ include "lloco.number" $v.jobs.finetune.warmupRatio }}
  context_ratio: {{ int64 $v.jobs.finetune.contextRatio }}
  num_workers: {{ int64 $v.jobs.finetune.numWorkers }}
  gpus_per_worker: {{ include "lloco.number" $v.jobs.finetune.gpusPerWorker }}
  cpus_per_worker: {{ include "lloco.number" $v.jobs.finetune.cpusPerWorker }}
{{- if $v.jobsCluster.enabled }}
jobs:
  ray_address: {{ include "lloco.jobsClusterAddress" . | quote }}
{{- end }}
{{- end }}

{{/*
Environment of every Ray container: only what does not change with the settings. The settings file
(LLOCO_CONFIG); S3 region, endpoint and keys (from a secret when one is named); the admin key on serving
pods only; Hugging Face offline (and its cache on the model volume); pip without a package index unless
allowed. Args: root, component.
*/}}
{{- define "lloco.env" -}}
{{- $root := .root }}
{{- $v := $root.Values -}}
- name: LLOCO_CONFIG
  value: {{ printf "%s/settings.yaml" (include "lloco.settingsDir" $root) | quote }}
- name: AWS_REGION
  value: {{ $v.s3.region | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ $v.s3.region | quote }}
{{- with $v.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ . | quote }}
{{- end }}
{{- with $v.s3.existingSecret }}
{{- range $name, $key := dict "LLOCO_STORE__ACCESS_KEY_ID" $v.s3.accessKeyIdKey "LLOCO_STORE__SECRET_ACCESS_KEY" $v.s3.secretAccessKeyKey "AWS_ACCESS_KEY_ID" $v.s3.accessKeyIdKey "AWS_SECRET_ACCESS_KEY" $v.s3.secretAccessKeyKey }}
- name: {{ $name }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.s3.existingSecret }}
      key: {{ $key }}
{{- end }}
{{- end }}
{{- if eq .component "serve" }}
- name: LLOCO_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lloco.adminSecretName" $root }}
      key: {{ $v.adminKey.secretKey }}
{{- end }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- with $v.model.hfCache }}
{{- if not $v.model.volume.existingClaim }}
{{- fail "model.hfCache names a folder of the model volume: set model.volume.existingClaim too" }}
{{- end }}
- name: HF_HUB_CACHE
  value: {{ printf "/models/%s" (trimPrefix "/" .) | quote }}
{{- end }}
{{- if not $v.model.allowPackageIndex }}
- name: PIP_NO_INDEX
  value: "1"
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The worker groups of one cluster as a YAML list: each group is `workerDefaults` with the group's own
fields put over it one by one (a shallow merge: a group's `tolerations: []` clears the default ones), and
a name from its index when it has none (what `--set workerGroups[0].x=y` leaves). Args: root, groups.
*/}}
{{- define "lloco.workerGroups" -}}
{{- $groups := list }}
{{- range $index, $group := .groups }}
{{- $merged := deepCopy $.root.Values.workerDefaults }}
{{- range $key, $value := $group }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- if not $merged.name }}
{{- $_ := set $merged "name" (printf "%s-%d" (ternary "gpu" "cpu" (gt (int64 $merged.gpus) 0)) $index) }}
{{- end }}
{{- $groups = append $groups $merged }}
{{- end }}
{{- toYaml $groups }}
{{- end }}

{{/*
The one Ray pod template: head and worker pods of the serving cluster, the jobs cluster and every job
cluster. Args: root, component (serve|jobs|compress|finetune), role (head|worker), group (resources,
gpus, gpuProduct, nodeSelector, tolerations, affinity, topologySpreadConstraints, runtimeClassName,
priorityClassName).
*/}}
{{- define "lloco.rayPodTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $gpus := int64 (default 0 .group.gpus) }}
{{- $resources := deepCopy (default dict .group.resources) }}
{{- if gt $gpus 0 }}
{{- $limits := default dict $resources.limits }}
{{- $_ := set $limits "nvidia.com/gpu" $gpus }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- $nodeSelector := deepCopy (default dict .group.nodeSelector) }}
{{- with .group.gpuProduct }}
{{- $_ := set $nodeSelector "nvidia.com/gpu.product" . }}
{{- end }}
{{- $tls := and (eq .component "serve") $v.serve.tls.existingSecret -}}
metadata:
  labels:
    {{- include "lloco.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "lloco.serviceAccountName" $root }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with .group.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .group.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumes:
    - name: cache
      emptyDir:
        sizeLimit: {{ $v.cache.sizeLimit }}
    - name: settings
      configMap:
        name: {{ include "lloco.settingsConfigMapName" $root }}
    {{- with $v.model.volume.existingClaim }}
    - name: models
      persistentVolumeClaim:
        claimName: {{ . }}
        readOnly: true
    {{- end }}
    {{- if $tls }}
    - name: tls
      secret:
        secretName: {{ $v.serve.tls.existingSecret }}
        defaultMode: 0400
    {{- end }}
    {{- with $v.volumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "lloco.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      env:
        {{- include "lloco.env" (dict "root" $root "component" .component) | trim | nindent 8 }}
      {{- with $v.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- if eq .role "head" }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        - name: metrics
          containerPort: 8080
        {{- if eq .component "serve" }}
        - name: serve
          containerPort: 8000
        {{- if eq .role "head" }}
        - name: grpc
          containerPort: {{ int64 $v.serve.grpcPort }}
        - name: openai
          containerPort: {{ int64 $v.serve.httpPort }}
        {{- end }}
        {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      volumeMounts:
        - name: cache
          mountPath: /cache
        - name: settings
          mountPath: {{ include "lloco.settingsDir" $root }}
          readOnly: true
        {{- with $v.model.volume.existingClaim }}
        - name: models
          mountPath: /models
          readOnly: true
          {{- with $v.model.volume.subPath }}
          subPath: {{ . }}
          {{- end }}
        {{- end }}
        {{- if $tls }}
        - name: tls
          mountPath: {{ include "lloco.tlsDir" $root }}
          readOnly: true
        {{- end }}
        {{- with $v.volumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
{{- end }}

{{/*
A whole Ray cluster spec: the head plus worker groups (merged over `workerDefaults`), all from
"lloco.rayPodTemplate", with the in-tree autoscaler; the serving cluster also gets the edge resource on
its head and, when enabled, GCS fault tolerance. Args: root, component, workerGroups (as in the values).
*/}}
{{- define "lloco.rayClusterSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $component := .component }}
{{- $groups := include "lloco.workerGroups" (dict "root" $root "groups" .workerGroups) | fromYamlArray -}}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: true
autoscalerOptions:
  version: v2
  upscalingMode: {{ $v.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ int64 $v.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  resources:
    {{- toYaml $v.autoscaler.resources | nindent 4 }}
{{- if and (eq $component "serve") $v.gcsFaultTolerance.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ required "gcsFaultTolerance.redisAddress is required when gcsFaultTolerance.enabled" $v.gcsFaultTolerance.redisAddress | quote }}
  {{- with $v.gcsFaultTolerance.existingSecret }}
  redisPassword:
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $v.gcsFaultTolerance.passwordKey }}
  {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    {{- range $key, $value := $v.head.rayStartParams }}
    {{ $key }}: {{ $value | quote }}
    {{- end }}
    {{- if eq $component "serve" }}
    {{- if hasKey $v.head.rayStartParams "resources" }}
    {{- fail "head.rayStartParams.resources: the chart sets the serving head's Ray resources (lloco_edge, for the gRPC edge)" }}
    {{- end }}
    {{- /* KubeRay passes it as --resources=<value> through a shell: JSON inside literal double quotes */}}
    resources: {{ printf "\"{\\\"%s\\\": %d}\"" (include "lloco.edgeResource" $root) (int64 $v.serve.ingress.replicas) | quote }}
    {{- end }}
  template:
    {{- include "lloco.rayPodTemplate" (dict "root" $root "component" $component "role" "head" "group" $v.head) | nindent 4 }}
{{- with $groups }}
workerGroupSpecs:
  {{- range $group := . }}
  - groupName: {{ $group.name }}
    replicas: {{ int64 $group.minReplicas }}
    minReplicas: {{ int64 $group.minReplicas }}
    maxReplicas: {{ int64 $group.maxReplicas }}
    {{- if hasKey $group "idleTimeoutSeconds" }}
    idleTimeoutSeconds: {{ int64 $group.idleTimeoutSeconds }}
    {{- end }}
    rayStartParams:
      {{- range $key, $value := $group.rayStartParams }}
      {{ $key }}: {{ $value | quote }}
      {{- else }} {}
      {{- end }}
    template:
      {{- include "lloco.rayPodTemplate" (dict "root" $root "component" $component "role" "worker" "group" $group) | nindent 6 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The spec of a RayJob (also the jobTemplate of a RayCronJob): the entrypoint runs on a fresh cluster
that KubeRay deletes when the job ends. HTTPMode: the operator submits the job to the dashboard,
so no submitter pod needs a way through the NetworkPolicy. Args: root, job, values, entrypoint.
*/}}
{{- define "lloco.rayJobSpec" -}}
entrypoint: {{ .entrypoint | quote }}
submissionMode: HTTPMode
shutdownAfterJobFinishes: true
ttlSecondsAfterFinished: {{ int64 .values.ttlSecondsAfterFinished }}
backoffLimit: {{ int64 .values.backoffLimit }}
{{- with .values.activeDeadlineSeconds }}
activeDeadlineSeconds: {{ int64 . }}
{{- end }}
rayClusterSpec:
  {{- include "lloco.rayClusterSpec" (dict "root" .root "component" .job "workerGroups" .values.workerGroups) | nindent 2 }}
{{- end }}

{{/*
Checks the values cannot express in the schema: unique worker group names, min <= max (after the merge
over `workerDefaults`). Args: path, root, groups (as in the values).
*/}}
{{- define "lloco.validateWorkerGroups" -}}
{{- $seen := dict }}
{{- range $group := include "lloco.workerGroups" (dict "root" .root "groups" .groups) | fromYamlArray }}
{{- if hasKey $seen $group.name }}
{{- fail (printf "%s: worker group name %q is used twice" $.path $group.name) }}
{{- end }}
{{- $_ := set $seen $group.name true }}
{{- if gt (int64 $group.minReplicas) (int64 $group.maxReplicas) }}
{{- fail (printf "%s: worker group %q has minReplicas %d > maxReplicas %d" $.path $group.name (int64 $group.minReplicas) (int64 $group.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Serve config (serveConfigV2): the application and its deployments. No grpc_options and no route
prefix: the Ingress replicas serve the gRPC API themselves (lloco.serve.server: serve.host, TLS,
message cap), on the head pod, which alone has the `lloco_edge` resource they ask for; Serve's HTTP
proxy stays for KubeRay's health checks and serves nothing of lloco. The deployment names are those of
the code (lloco.serve.ingress.Ingress, lloco.serve.engine.EngineDeployment); `num_replicas: auto` makes
the Engine's autoscaling config here replace the fixed replica count the code sets. The Ingress has a
fixed count: its calls do not pass through Serve, whose autoscaler would not see them.

The args carry the settings the deployments run with, so a change to them is a new application version
that Serve rolls out on the running cluster. The batch jobs' sections (compress, finetune) stay out of
them: the jobs read those from the settings file, and a change there restarts no replica.
*/}}
{{- define "lloco.serveConfig" -}}
{{- $v := .Values }}
{{- $settings := include "lloco.settings" . | fromYaml -}}
{{- $engine := $v.serve.engine -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: 8000
logging_config:
  encoding: JSON
applications:
  - name: lloco
    route_prefix: null
    import_path: lloco.serve.app:app
    args:
      {{- pick $settings "store" "model" "limits" "lora" "engine" "serve" "jobs" | toYaml | nindent 6 }}
    deployments:
      - name: Ingress
        num_replicas: {{ int64 $v.serve.ingress.replicas }}
        ray_actor_options:
          num_cpus: {{ include "lloco.number" $v.serve.ingress.numCpus }}
          resources:
            {{ include "lloco.edgeResource" . }}: 1
      - name: EngineDeployment
        num_replicas: auto
        max_ongoing_requests: {{ int64 $engine.maxOngoingRequests }}
        max_surge_percent: {{ int64 $engine.maxSurgePercent }}
        autoscaling_config:
          min_replicas: {{ int64 $engine.minReplicas }}
          max_replicas: {{ int64 $engine.maxReplicas }}
          target_ongoing_requests: {{ include "lloco.number" $engine.targetOngoingRequests }}
        ray_actor_options:
          num_cpus: {{ include "lloco.number" $engine.numCpus }}
          num_gpus: {{ include "lloco.number" $engine.numGpus }}
{{- end }}

{{/* The gRPC health probe of the `helm test` pod, run with the image's Python (over TLS when GRPC_CA_FILE is set). */}}
{{- define "lloco.healthProbe" -}}
import os
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target = os.environ["GRPC_TARGET"]
ca_file = os.environ.get("GRPC_CA_FILE")
deadline = time.monotonic() + float(os.environ["TIMEOUT_SECONDS"])
while True:
    try:
        if ca_file:
            with open(ca_file, "rb") as ca:
                channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read()))
        else:
            channel = grpc.insecure_channel(target)
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as error:
        status = error.code().name
    print(f"grpc.health.v1 Check {target}: {status}", flush=True)
    if status == "SERVING":
        sys.exit(0)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        sys.exit(1)
    time.sleep(min(5.0, remaining))
{{- end }}
