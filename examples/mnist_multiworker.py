"""Multi-worker Keras training on CPU, for the agentd examples.

Each worker reads its peers and its own role from TF_CONFIG (written by agentd, or by the
Kubeflow operator), joins a tf.distribute.MultiWorkerMirroredStrategy cluster, and trains a small
dense model on synthetic MNIST-shaped data generated here, so nothing is downloaded. It prints one
line per epoch and exits 0.

Without TF_CONFIG it trains alone, which makes it easy to try by hand:

    python3 examples/mnist_multiworker.py --epochs 1
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

IMAGE_SHAPE = (28, 28)
CLASSES = 10


def synthetic_mnist(samples, seed):
    """Images whose mean brightness depends on the label, so the model has something to learn."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=samples).astype(np.int64)
    noise = rng.random((samples, *IMAGE_SHAPE), dtype=np.float32)
    images = noise * 0.5 + (labels[:, None, None].astype(np.float32) / CLASSES) * 0.5
    return images, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--batch-size-per-worker", type=int, default=64)
    args = parser.parse_args()

    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    role = f"{task.get('type', 'worker')}-{task.get('index', 0)}"
    workers = len(tf_config.get("cluster", {}).get("worker", [])) or 1

    # The strategy reads TF_CONFIG and blocks until every worker of the cluster has joined.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    print(
        f"{role}: joined a cluster of {strategy.num_replicas_in_sync} replica(s) "
        f"on {workers} worker(s)",
        flush=True,
    )

    global_batch = args.batch_size_per_worker * workers
    images, labels = synthetic_mnist(samples=4096, seed=42)
    dataset = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .shuffle(4096, seed=42)
        .repeat()
        .batch(global_batch)
    )
    # Each worker takes its own share of the batches.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    dataset = dataset.with_options(options)

    with strategy.scope():
        model = tf.keras.Sequential(
            [
                tf.keras.layers.Input(shape=IMAGE_SHAPE),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(64, activation="relu"),
                tf.keras.layers.Dense(CLASSES),
            ]
        )
        model.compile(
            optimizer=tf.keras.optimizers.SGD(learning_rate=0.05),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )

    class EpochLine(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            print(
                f"{role}: epoch {epoch + 1}/{args.epochs} "
                f"loss={logs.get('loss', float('nan')):.4f} "
                f"accuracy={logs.get('accuracy', float('nan')):.4f}",
                flush=True,
            )

    model.fit(
        dataset,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        verbose=0,
        callbacks=[EpochLine()],
    )
    print(f"{role}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
