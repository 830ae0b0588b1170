-- Orders, sharded by an integer id: the key 42 routes as "42".
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    total_cents INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'new'
);
