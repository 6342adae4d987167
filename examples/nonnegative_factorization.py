"""Non-negative matrix factorization: Keras NonNeg constraints become L-BFGS-B bounds.

Run: python examples/nonnegative_factorization.py
"""

import numpy as np
from tensorflow import keras

import kormos

keras.config.set_floatx("float64")
rng = np.random.default_rng(0)
num_users, num_items, rank = 200, 300, 4

# A non-negative low-rank "ratings" matrix, observed on 30% of its entries.
true_users = rng.gamma(2.0, 0.5, (num_users, rank))
true_items = rng.gamma(2.0, 0.5, (num_items, rank))
mask = rng.random((num_users, num_items)) < 0.3
users, items = np.nonzero(mask)
ratings = (true_users @ true_items.T)[users, items]
ratings += 0.05 * rng.normal(size=ratings.shape)


def build_model():
    user, item = keras.Input((1,), dtype="int32"), keras.Input((1,), dtype="int32")
    nonneg = dict(
        embeddings_initializer=keras.initializers.RandomUniform(0.0, 1.0, seed=1),
        embeddings_constraint=keras.constraints.NonNeg(),  # -> bounds [0, inf)
    )
    u = keras.layers.Embedding(num_users, rank, name="users", **nonneg)(user)
    v = keras.layers.Embedding(num_items, rank, name="items", **nonneg)(item)
    rating = keras.layers.Flatten()(keras.layers.Dot(axes=2)([u, v]))
    return kormos.BatchOptimizedModel(inputs=[user, item], outputs=rating)


model = build_model()
model.compile(loss="mse", optimizer="l-bfgs-b")
history = model.fit(
    (users, items),
    ratings[:, None],
    epochs=200,
    verbose=0,
    options={"gtol": 1e-8},
)
factors = model.optimizer.get_weights()
result = model.optimizer.results[-1]
print(f"iterations: {result.nit}, loss: {history.history['loss'][-1]:.6f}")
print(f"smallest factor entry: {factors.min():.3g} (bounded below by 0)")
print(f"entries at the bound: {np.mean(factors == 0.0):.1%}")
held_out = ~mask
pred = model.predict(
    (np.nonzero(held_out)[0], np.nonzero(held_out)[1]), batch_size=20000, verbose=0
).ravel()
truth = (true_users @ true_items.T)[held_out]
print(f"RMSE on unobserved entries: {np.sqrt(np.mean((pred - truth) ** 2)):.4f}")
