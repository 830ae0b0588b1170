-- Users, sharded by their text id.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT,
    email TEXT,
    age INTEGER,
    profile TEXT
);
CREATE INDEX users_email ON users (email);
