"""Talks to kube-sim over HTTPS with the official Python `kubernetes` client: the CA and token
come from the kubeconfig given; prints one line per check for the Rust test to assert on.
Usage: auth_check.py ADMIN_KUBECONFIG RESTRICTED_KUBECONFIG
"""
import sys

from kubernetes import client, config
from kubernetes.client.rest import ApiException

admin = config.new_client_from_config(config_file=sys.argv[1])
restricted = config.new_client_from_config(config_file=sys.argv[2])

host = admin.configuration.host
print("scheme " + host.split(":")[0])
nodes = client.CoreV1Api(admin).list_node().items
print("admin nodes " + ",".join(n.metadata.name for n in nodes))

try:
    client.CoreV1Api(restricted).list_node()
    print("restricted nodes allowed")
except ApiException as e:
    print(f"restricted nodes {e.status} {e.reason}")
    import json

    body = json.loads(e.body)
    print(f"status {body['reason']}: {body['message']}")

review = client.V1SelfSubjectAccessReview(
    spec=client.V1SelfSubjectAccessReviewSpec(
        resource_attributes=client.V1ResourceAttributes(
            verb="list", resource="pods", namespace="default"
        )
    )
)
answer = client.AuthorizationV1Api(restricted).create_self_subject_access_review(review)
print(f"can list pods {answer.status.allowed}")
