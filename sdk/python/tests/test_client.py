"""The SDK against a real agent. The Rust test `sdk::python_sdk_against_a_real_agent` starts
the agent, installs this package with pip and runs these tests with AGENTD_SOCKET set."""

import os
import tempfile
import unittest
from pathlib import Path

from agentd_client import ApiError, Client, Unreachable


def manifest(name: str, script: str) -> str:
    return (
        "apiVersion: agentd.io/v1alpha1\nkind: TrainingJob\n"
        f"metadata: {{name: {name}}}\nspec:\n  replicaSpecs:\n    Worker:\n      replicas: 2\n"
        "      template:\n        spec:\n          containers:\n          - name: tensorflow\n"
        f"            command: [sh, -c, {script!r}]\n"
    )


class ClientTest(unittest.TestCase):
    client: Client

    @classmethod
    def setUpClass(cls) -> None:
        if "AGENTD_SOCKET" not in os.environ:
            raise unittest.SkipTest("AGENTD_SOCKET names no running agent")
        cls.client = Client()

    def test_reads(self) -> None:
        status = self.client.status()
        self.assertEqual(status["agent"]["mode"], "standalone")
        nodes = self.client.nodes()
        self.assertEqual(len(nodes), 1)
        self.assertIn("gpus", nodes[0])
        self.assertEqual({q["name"] for q in self.client.queues()}, {"fast", "slow"})
        whole = self.client.queue_list()
        self.assertEqual([q["name"] for q in whole["queues"]],
                         [q["name"] for q in self.client.queues()])
        # Standalone: the queues are the agent's own configuration, and in force.
        self.assertNotIn("source", whole)
        self.assertNotIn("problem", whole)

    def test_submit_wait_logs(self) -> None:
        job = self.client.submit(manifest("sdk-text", "echo done"))
        self.assertEqual(job["name"], "sdk-text")
        self.assertEqual(job["owner"]["uid"], os.getuid())
        final = self.client.wait("sdk-text", timeout=60)
        self.assertEqual(final["state"], "Succeeded")
        # Without a chief the job succeeds when worker 0 does; worker 1 may be stopped before
        # it prints, so only worker 0's log is sure to hold the line.
        self.assertIn("done", self.client.logs("sdk-text", replica="worker-0"))
        followed = "".join(self.client.logs("sdk-text", follow=True))
        self.assertIn("done", followed)
        names = [j["name"] for j in self.client.jobs(state="Succeeded")]
        self.assertIn("sdk-text", names)

    def test_submit_from_a_path_and_a_dict(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "job.yaml"
            path.write_text(manifest("sdk-path", "true"))
            self.assertEqual(self.client.submit(path)["name"], "sdk-path")
            with self.assertRaises(ApiError) as caught:
                self.client.submit(str(path))  # the same job again, from the path as text
            self.assertEqual(caught.exception.code, "conflict")
        as_dict = {
            "apiVersion": "agentd.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": "sdk-dict"},
            "spec": {"replicaSpecs": {"Worker": {"replicas": 1, "template": {"spec": {
                "containers": [{"name": "tensorflow", "command": ["sleep", "600"]}]}}}}},
        }
        self.assertEqual(self.client.submit(as_dict)["name"], "sdk-dict")
        with self.assertRaises(TimeoutError):
            self.client.wait("sdk-dict", timeout=0.5)
        cancelled = self.client.cancel("sdk-dict")
        self.assertEqual(cancelled["state"], "Cancelled")
        self.assertEqual(self.client.wait("sdk-path", timeout=60)["state"], "Succeeded")

    def test_errors_carry_code_message_and_field(self) -> None:
        with self.assertRaises(ApiError) as caught:
            self.client.job("no-such-job")
        self.assertEqual((caught.exception.status, caught.exception.code), (404, "not_found"))
        bad = manifest("sdk-bad", "true").replace("replicas: 2", "replicas: -1")
        with self.assertRaises(ApiError) as caught:
            self.client.submit(bad)
        self.assertEqual(caught.exception.code, "invalid_spec")
        self.assertEqual(caught.exception.field, "spec.replicaSpecs.Worker.replicas")
        with self.assertRaises(ApiError) as caught:
            self.client.jobs(state="sleeping")
        self.assertEqual((caught.exception.code, caught.exception.field), ("bad_request", "state"))

    def test_templates(self) -> None:
        saved = self.client.save_template("sdk-tpl", manifest("base", "echo from a template"))
        self.assertEqual(saved["owner"]["uid"], os.getuid())
        self.assertIn("sdk-tpl", [t["name"] for t in self.client.templates()])
        self.assertIn("echo from a template", self.client.template("sdk-tpl")["manifest"])
        job = self.client.submit_template("sdk-tpl", "sdk-from-tpl", {
            "spec.replicaSpecs.Worker.replicas": 1, "metadata.labels.team": "sdk"})
        self.assertEqual(job["template"]["name"], "sdk-tpl")
        self.assertEqual(len(job["replicas"]), 1)
        self.assertEqual(self.client.wait("sdk-from-tpl", timeout=60)["state"], "Succeeded")
        with self.assertRaises(ApiError) as caught:
            self.client.submit_template("sdk-tpl", "sdk-bad-tpl",
                                        {"spec.replicaSpecs.Worker.replicas": -1})
        self.assertEqual((caught.exception.code, caught.exception.field),
                         ("invalid_spec", "spec.replicaSpecs.Worker.replicas"))
        self.client.delete_template("sdk-tpl")
        with self.assertRaises(ApiError) as caught:
            self.client.template("sdk-tpl")
        self.assertEqual(caught.exception.code, "not_found")

    def test_unreachable(self) -> None:
        with self.assertRaises(Unreachable):
            Client(socket="/nonexistent/agentd.sock").status()


if __name__ == "__main__":
    unittest.main()
