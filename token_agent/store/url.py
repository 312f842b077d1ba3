"""Store URLs: where a PostgreSQL store is, named in config.toml (``[store] url``),
``TOKEN_AGENT_STORE_URL`` or ``--store-url``.

A URL is libpq's: ``postgresql://USER@HOST:PORT/DBNAME`` or, over a Unix socket,
``postgresql:///DBNAME?host=/run/postgresql``. It never carries the password: a URL goes
through argv, the environment, logs and messages, all of which other people may read. The
password comes from ``[store] password_file`` (a private file) or libpq's own means
(``PGPASSFILE`` / ``~/.pgpass``, peer or certificate authentication).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

SCHEMES = ("postgresql", "postgres")
#: the environment variable naming the store's URL
STORE_URL_ENV = "TOKEN_AGENT_STORE_URL"
#: URL parameters that carry a secret (the password, the client key's passphrase)
SECRET_PARAMETERS = ("password", "sslpassword")


def is_url(target: object) -> bool:
    """Whether ``target`` names a database by URL (else it is a SQLite file's path)."""
    return isinstance(target, str) and target.split(":", 1)[0].lower() in SCHEMES \
        and "://" in target


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a store URL, or None."""
    if not isinstance(url, str) or not url.strip():
        return "is empty"
    if not is_url(url):
        return "is not a postgresql:// URL (e.g. postgresql://token_agent@db.example.nhs.uk/token_agent)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (a bad port raises here)
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.password is not None or any(k.lower() in SECRET_PARAMETERS for k, _ in
                                         parse_qsl(parts.query, keep_blank_values=True)):
        return ("carries a password: never put it in the URL (argv, the environment and logs "
                "show it); use [store] password_file in config.toml, or libpq's PGPASSFILE / "
                "~/.pgpass")
    if not parts.path.strip("/") and not any(k.lower() == "dbname" for k, _ in
                                             parse_qsl(parts.query)):
        return "names no database (postgresql://HOST/DBNAME)"
    return None


def redact(url: str) -> str:
    """``url`` for messages, as written, but with any password masked (should one be
    there anyway)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<invalid URL>"
    netloc = parts.netloc
    if password is not None:
        netloc = netloc.replace(f":{password}@", ":***@", 1)
    query = "&".join(
        f"{k}=***" if k.lower() in SECRET_PARAMETERS else item
        for item in parts.query.split("&") if item
        for k in (item.split("=", 1)[0],))
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))
