"""A client for the agentd GPU node agent's API, standard library only.

    from agentd_client import Client
    client = Client()                      # the local agent's socket (AGENTD_SOCKET or the default)
    job = client.submit("examples/mnist-trainingjob.yaml")
    final = client.wait(job["name"], timeout=600)
"""

from .client import ApiError, Client, Unreachable, DEFAULT_SOCKET, FINISHED_STATES

__all__ = ["ApiError", "Client", "Unreachable", "DEFAULT_SOCKET", "FINISHED_STATES"]
