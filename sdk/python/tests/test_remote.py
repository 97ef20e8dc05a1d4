"""The SDK over the agent's HTTPS listener. The Rust test `sdk::python_sdk_over_https` starts an
agent with the listener on, makes a token, and runs these tests with AGENTD_SERVER,
AGENTD_CA_FILE and AGENTD_TOKEN_FILE set (and AGENTD_TEST_USER naming the token's user), and
a client certificate for another user, AGENTD_TEST_CERT_USER, in AGENTD_TEST_CERT_FILE and
AGENTD_TEST_KEY_FILE."""

import os
import unittest
from unittest import mock

from agentd_client import ApiError, Client, Unreachable


def manifest(name: str, script: str) -> str:
    return (
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\n"
        f"metadata: {{name: {name}}}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 1\n"
        "      template:\n        spec:\n          containers:\n          - name: tensorflow\n"
        f"            command: [sh, -c, {script!r}]\n"
    )


class RemoteClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        if "AGENTD_SERVER" not in os.environ:
            raise unittest.SkipTest("AGENTD_SERVER names no running agent")

    def test_submit_wait_logs_as_the_tokens_user(self) -> None:
        client = Client(server=os.environ["AGENTD_SERVER"],
                        token=open(os.environ["AGENTD_TOKEN_FILE"]).read().strip(),
                        ca_file=os.environ["AGENTD_CA_FILE"])
        self.assertEqual(client.status()["agent"]["mode"], "standalone")
        job = client.submit(manifest("sdk-https", "echo over https"))
        self.assertEqual(job["owner"]["user"], os.environ["AGENTD_TEST_USER"])
        final = client.wait("sdk-https", timeout=120, poll=0.2)
        self.assertEqual(final["state"], "Succeeded", final)
        self.assertIn("over https", client.logs("sdk-https"))
        self.assertIn("over https", "".join(client.logs("sdk-https", follow=True)))

    def test_settings_from_the_environment(self) -> None:
        client = Client()
        self.assertEqual(client.server, os.environ["AGENTD_SERVER"])
        self.assertIsInstance(client.jobs(), list)

    def test_a_bad_token_is_401(self) -> None:
        client = Client(token="agentd_not-a-token")
        with self.assertRaises(ApiError) as refused:
            client.jobs()
        self.assertEqual(refused.exception.status, 401)
        self.assertEqual(refused.exception.code, "unauthorized")
        self.assertIn("not valid", refused.exception.message)

    def test_a_client_certificate_acts_as_its_common_name(self) -> None:
        # No token at all: the certificate alone says who calls.
        with mock.patch.dict(os.environ):
            del os.environ["AGENTD_TOKEN_FILE"]
            client = Client(server=os.environ["AGENTD_SERVER"],
                            ca_file=os.environ["AGENTD_CA_FILE"],
                            cert_file=os.environ["AGENTD_TEST_CERT_FILE"],
                            key_file=os.environ["AGENTD_TEST_KEY_FILE"])
        job = client.submit(manifest("sdk-mtls", "true"))
        self.assertEqual(job["owner"]["user"], os.environ["AGENTD_TEST_CERT_USER"])
        client.cancel("sdk-mtls")

    def test_an_untrusted_certificate_is_unreachable(self) -> None:
        # The system's roots do not hold the test CA: TLS fails, and says so.
        client = Client(server=os.environ["AGENTD_SERVER"], token="x",
                        ca_file=os.environ["AGENTD_OTHER_CA_FILE"])
        with self.assertRaises(Unreachable):
            client.jobs()


if __name__ == "__main__":
    unittest.main()
