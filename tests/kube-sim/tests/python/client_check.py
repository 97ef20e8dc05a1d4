"""Drives the kube-sim API server with the official Python `kubernetes` client.

Prints one line per check; the Rust test asserts on those lines. Usage: client_check.py KUBECONFIG
"""
import sys
import time

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

config.load_kube_config(config_file=sys.argv[1])
v1 = client.CoreV1Api()
custom = client.CustomObjectsApi()

names = sorted(n.metadata.name for n in v1.list_namespace().items)
print("namespaces " + ",".join(names))


def pod(name, role):
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name,
            labels={"app": "py", "role": role},
            annotations={"sim.agentd.io/log": "hello from python"},
        ),
        spec=client.V1PodSpec(
            node_name="node-0",
            containers=[
                client.V1Container(
                    name="main",
                    image="busybox:1.36",
                    env=[client.V1EnvVar(name="A", value="1")],
                )
            ],
        ),
    )


created = v1.create_namespaced_pod("default", pod("py-0", "chief"))
print(f"created {created.metadata.name} {created.status.phase}")
v1.create_namespaced_pod("default", pod("py-1", "worker"))
sel = v1.list_namespaced_pod("default", label_selector="app=py,role!=chief")
print("selected " + ",".join(p.metadata.name for p in sel.items))

# A dict body is sent as a strategic merge patch: containers and env merge by name.
patched = v1.patch_namespaced_pod(
    "py-0",
    "default",
    {"spec": {"containers": [{"name": "main", "image": "busybox:1.37", "env": [{"name": "B", "value": "2"}]}]}},
)
c = patched.spec.containers[0]
print(f"patched py-0 image={c.image} env={','.join(e.name for e in c.env)}")

# A watch from the version the create answered sees every change since, however soon the
# kubelet ran the pod: the patch above, then the pod running.
seen = set()


def watch_py0(**args):
    w = watch.Watch()
    for event in w.stream(v1.list_namespaced_pod, "default", field_selector="metadata.name=py-0", **args):
        obj = event["object"]
        key = f"watch {event['type']} {obj.metadata.name}"
        if key not in seen:
            seen.add(key)
            print(key)
        if event["type"] == "ADDED" or obj.status.phase == "Running":
            w.stop()


watch_py0(resource_version=created.metadata.resource_version, timeout_seconds=20)
# A watch from no version starts with the object as it is now, as ADDED.
watch_py0(timeout_seconds=20)

print(f"phase py-0 {v1.read_namespaced_pod('py-0', 'default').status.phase}")
print("log py-0 " + v1.read_namespaced_pod_log("py-0", "default").splitlines()[0])

gangs = custom.list_namespaced_custom_object("agentd.io", "v1", "default", "gangs")
for g in gangs["items"]:
    print(f"gangs {g['metadata']['name']} size={g['spec']['size']}")
custom.patch_namespaced_custom_object_status(
    "agentd.io", "v1", "default", "gangs", "g", {"status": {"phase": "Ready"}}
)
g = custom.get_namespaced_custom_object("agentd.io", "v1", "default", "gangs", "g")
print(f"gang status {g['status']['phase']}")

try:
    v1.read_namespaced_pod("missing", "default")
except ApiException as e:
    import json

    print(f"not found {e.status} {json.loads(e.body)['reason']}")

stale = v1.read_namespaced_pod("py-1", "default")
stale.metadata.resource_version = "1"
try:
    v1.replace_namespaced_pod("py-1", "default", stale)
except ApiException as e:
    import json

    print(f"conflict {e.status} {json.loads(e.body)['reason']}")

v1.delete_namespaced_pod("py-1", "default", grace_period_seconds=0)
deadline = time.time() + 10
while time.time() < deadline:
    try:
        v1.read_namespaced_pod("py-1", "default")
        time.sleep(0.1)
    except ApiException as e:
        if e.status == 404:
            print("deleted py-1")
            break
