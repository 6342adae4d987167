"""Collaborative filtering by matrix factorization (kormos 0.1 README example).

The 2022 example downloads MovieLens-small (ml-latest-small/ratings.csv). This
script never downloads anything: `synthetic_ratings()` builds a ratings table
of the same shape (610 users, 9,724 movies, 100,836 ratings, ratings 0.5 to 5
in steps of 0.5) from a rank-3 model with biases plus noise, with a fixed seed.
The preprocessing, the model and the training call are the README's code, with
two changes: `keras.utils.set_random_seed(1)` makes the output reproducible,
and the comma missing after `verbose=1` in the 2022 README (a SyntaxError) is
added. A second fit() at the end, not in the README, continues training.

Note: the model's output has shape (n, 1, 1) and `y` has shape (n,). kormos
reshapes `y` to (n, 1, 1) for the full-batch fit, as tf.keras 2 did; Keras 3
on its own would broadcast the loss to (n, 1, n).

Run:  python examples/matrix_factorization.py   (about 25 s on 2 CPU cores)
"""
# ruff: noqa: E402, E501  (the 2022 README's code is kept as written)
import numpy as np
import pandas as pd


def synthetic_ratings(num_users=610, num_movies=9724, num_ratings=100836, seed=42):
    """A MovieLens-small-shaped ratings table: userId, movieId, rating."""
    rng = np.random.default_rng(seed)
    # Skewed activity and popularity, as in real rating data.
    user_weight = rng.lognormal(0.0, 1.0, num_users)
    movie_weight = 1.0 / np.arange(1, num_movies + 1) ** 0.8
    rng.shuffle(movie_weight)
    # Every user and every movie has at least one rating.
    users = [np.arange(num_users), rng.integers(0, num_users, num_movies)]
    movies = [rng.integers(0, num_movies, num_users), np.arange(num_movies)]
    codes = np.concatenate(users) * num_movies + np.concatenate(movies)
    codes = codes[np.sort(np.unique(codes, return_index=True)[1])]
    while codes.size < num_ratings:
        u = rng.choice(num_users, num_ratings, p=user_weight / user_weight.sum())
        m = rng.choice(num_movies, num_ratings, p=movie_weight / movie_weight.sum())
        codes = np.concatenate([codes, u * num_movies + m])
        codes = codes[np.sort(np.unique(codes, return_index=True)[1])]
    codes = np.sort(codes[:num_ratings])
    u, m = codes // num_movies, codes % num_movies
    # Ratings from a rank-3 model with user/movie biases plus noise, rounded
    # to the 0.5 .. 5.0 scale.
    rank = 3
    p = rng.normal(0.0, 0.5, (num_users, rank))
    q = rng.normal(0.0, 0.5, (num_movies, rank))
    score = (
        3.5
        + rng.normal(0.0, 0.4, num_users)[u]
        + rng.normal(0.0, 0.4, num_movies)[m]
        + np.sum(p[u] * q[m], axis=1)
        + rng.normal(0.0, 0.5, num_ratings)
    )
    rating = np.clip(np.round(score * 2) / 2, 0.5, 5.0)
    movie_ids = np.sort(rng.choice(np.arange(1, 193610), num_movies, replace=False))
    return pd.DataFrame({"userId": u + 1, "movieId": movie_ids[m], "rating": rating})


# ---------------------------------------------------------------------------
# Define the Model (as in the 2022 README)
# ---------------------------------------------------------------------------
import tensorflow as tf
from tensorflow import keras
import kormos

def build_model(rank, num_users, num_items, **kwargs):
    inputs = [
        keras.Input(shape=(1,), name="user", dtype=tf.int32),
        keras.Input(shape=(1,), name="item", dtype=tf.int32),
    ]
    user_embedding = keras.layers.Embedding(
        input_dim=(num_users + 1),
        output_dim=rank,
        mask_zero=True,
        embeddings_initializer="normal",
        embeddings_regularizer=keras.regularizers.L2(1e-5),
        name="user_embedding",
    )
    item_embedding = keras.layers.Embedding(
        input_dim=(num_items + 1),
        output_dim=rank,
        mask_zero=True,
        embeddings_initializer="normal",
        embeddings_regularizer=keras.regularizers.L2(1e-5),
        name="item_embedding",
    )
    features = [
        user_embedding(inputs[0]),
        item_embedding(inputs[1]),
    ]
    output = keras.layers.Dot(axes=2, normalize=False)(features)
    model = kormos.models.BatchOptimizedModel(
        inputs=inputs,
        outputs=output,
        **kwargs
    )
    return model

# ---------------------------------------------------------------------------
# Prepare the Data (as in the 2022 README, without the download)
# ---------------------------------------------------------------------------
df = synthetic_ratings()  # replaces pd.read_csv(ratings_file)
keras.utils.set_random_seed(1)  # not in the 2022 README: reproducible init

user_ids = df["userId"].unique().tolist()
user2user_encoded = {x: i for i, x in enumerate(user_ids)}
userencoded2user = {i: x for i, x in enumerate(user_ids)}
movie_ids = df["movieId"].unique().tolist()
movie2movie_encoded = {x: i for i, x in enumerate(movie_ids)}
movie_encoded2movie = {i: x for i, x in enumerate(movie_ids)}
df["user"] = df["userId"].map(user2user_encoded)
df["movie"] = df["movieId"].map(movie2movie_encoded)

num_users = len(user2user_encoded)
num_movies = len(movie_encoded2movie)
df["rating"] = df["rating"].values.astype(np.float32)
# min and max ratings will be used to normalize the ratings later
min_rating = min(df["rating"])
max_rating = max(df["rating"])

print(
    "Number of users: {}, Number of Movies: {}, Min rating: {}, Max rating: {}".format(
        num_users, num_movies, min_rating, max_rating
    )
)

df = df.sample(frac=1, random_state=42)
x = df[["user", "movie"]].values
# Normalize the targets between 0 and 1. Makes it easy to train.
y = df["rating"].apply(lambda x: (x - min_rating) / (max_rating - min_rating)).values
# Assuming training on 90% of the data and validating on 10%.
train_indices = int(0.9 * df.shape[0])
x_train, x_val, y_train, y_val = (
    x[:train_indices],
    x[train_indices:],
    y[:train_indices],
    y[train_indices:],
)

# ---------------------------------------------------------------------------
# Train the Model (as in the 2022 README)
# ---------------------------------------------------------------------------
rank = 5
model = build_model(rank, num_users, num_movies)
model.compile(
    loss=tf.keras.losses.MeanSquaredError(),
    optimizer="l-bfgs-b",
)

history = model.fit(
  x=(x_train[:, 0], x_train[:, 1]),
  y=y_train,
  batch_size=2**14,
  epochs=10,
  verbose=1,  # the 2022 README lacks this comma (a SyntaxError); the only fix
  validation_data=((x_val[:, 0], x_val[:, 1]), y_val),
)

with pd.option_context("display.max_columns", None, "display.width", 120):
    print(pd.DataFrame(history.history))

# ---------------------------------------------------------------------------
# Not in the 2022 README: fit() again to continue from the current weights
# (epochs counts from initial_epoch, as in Keras).
# ---------------------------------------------------------------------------
more = model.fit(
    x=(x_train[:, 0], x_train[:, 1]),
    y=y_train,
    batch_size=2**14,
    epochs=60,
    initial_epoch=10,
    verbose=0,
    validation_data=((x_val[:, 0], x_val[:, 1]), y_val),
)
with pd.option_context("display.max_columns", None, "display.width", 120):
    print(pd.DataFrame(more.history, index=more.epoch).iloc[[0, 10, 20, 30, 40, -1]])
print("final:", model.optimizer.results[-1].message)
