"""Documents shared by the workload tests: the examples directory and two richer inputs
that use most of what the importers map."""

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

RICH_COMPOSE = """
version: "3.8"
services:
  web:
    image: registry.lab:5000/web:1
    entrypoint: ["/bin/web"]
    command: --port 8080
    ports:
      - target: 8080
        published: 80
        protocol: tcp
        mode: host
    environment: {DB: "postgres:5432"}
    volumes:
      - type: bind
        source: /mnt/gluster/web
        target: /data
        read_only: true
        bind: {propagation: rprivate}
    healthcheck: {test: ["CMD", "/bin/check"], interval: 10s, timeout: 2s, retries: 3, start_period: 5s}
    depends_on:
      db: {condition: service_started}
    deploy:
      mode: replicated
      replicas: 2
      placement:
        constraints: [node.labels.disk == ssd]
        preferences: [{spread: node.labels.zone}]
        max_replicas_per_node: 1
      resources:
        limits: {cpus: "0.5", memory: 128M}
        reservations:
          memory: 64M
          devices: [{driver: nvidia, count: 1, capabilities: [gpu]}]
      restart_policy: {condition: on-failure, delay: 5s, max_attempts: 3, window: 30s}
      update_config:
        parallelism: 2
        delay: 10s
        failure_action: rollback
        monitor: 10s
        max_failure_ratio: 0.1
        order: start-first
      rollback_config: {parallelism: 1, order: stop-first}
  db:
    image: postgres:15-alpine
    volumes: [pgdata:/var/lib/postgresql/data]
volumes:
  pgdata: {driver: local}
networks:
  net: {driver: overlay, attachable: true}
"""

RICH_KUBERNETES = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  minReadySeconds: 5
  strategy: {type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 0}}
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 20
      nodeSelector: {kubernetes.io/arch: arm64}
      volumes:
        - {name: data, hostPath: {path: /mnt/gluster/web}}
      containers:
        - name: web
          image: registry.lab:5000/web:1
          command: [/bin/web]
          args: [--port, "8080"]
          ports: [{containerPort: 8080, name: http}]
          env:
            - {name: A, value: "1"}
            - name: B
              valueFrom: {secretKeyRef: {name: web-secrets, key: b}}
          resources:
            requests: {memory: 64Mi, cpu: 100m}
            limits: {memory: 128Mi, cpu: 500m}
          readinessProbe:
            httpGet: {path: /health, port: http}
            periodSeconds: 5
          livenessProbe:
            tcpSocket: {port: 8080}
          volumeMounts: [{name: data, mountPath: /data, readOnly: true}]
          securityContext: {runAsUser: 1000}
---
apiVersion: v1
kind: Service
metadata: {name: web-svc}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 8080, targetPort: http, nodePort: 30080}]
"""
