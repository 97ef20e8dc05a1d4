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
    """Noise images with two bright rows whose position is the label: easy to learn, so the loss
    visibly falls within a few steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=samples).astype(np.int64)
    images = rng.random((samples, *IMAGE_SHAPE), dtype=np.float32) * 0.3
    for row in range(2):
        images[np.arange(samples), labels * 2 + row + 4, :] += 1.0
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
        optimizer = tf.keras.optimizers.SGD(learning_rate=0.1)
    batches = iter(strategy.experimental_distribute_dataset(dataset))

    # A custom loop rather than model.fit: Keras 3's fit does not accept the per-replica batches
    # of a multi-worker strategy, while a loop under strategy.run works with Keras 2 and 3 alike.
    @tf.function
    def train_step(iterator):
        def step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                per_example = tf.nn.sparse_softmax_cross_entropy_with_logits(
                    labels=y, logits=logits
                )
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            grads = tape.gradient(loss, model.trainable_variables)
            # Under the strategy, this all-reduces the gradients across every worker.
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float32))
            return loss, correct

        x, y = next(iterator)
        loss, correct = strategy.run(step, args=(x, y))
        return (
            strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None),
            strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None),
        )

    for epoch in range(args.epochs):
        total_loss = 0.0
        total_correct = 0.0
        for _ in range(args.steps_per_epoch):
            loss, correct = train_step(batches)
            total_loss += float(loss)
            total_correct += float(correct)
        # Workers that train together hold the same weights: the checksum shows it.
        checksum = sum(float(tf.reduce_sum(v)) for v in model.trainable_variables)
        print(
            f"{role}: epoch {epoch + 1}/{args.epochs} "
            f"loss={total_loss / args.steps_per_epoch:.4f} "
            f"accuracy={total_correct / (args.steps_per_epoch * global_batch):.4f} "
            f"weights={checksum:.6f}",
            flush=True,
        )
    print(f"{role}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
