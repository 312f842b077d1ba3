"""PAM module for token-agent, run by libpam-python (``pam_python.so``).

    auth required pam_python.so /usr/lib/token-agent/pam_token_agent.py \\
        login_socket=/run/token-agent/login.sock socket=/run/token-agent/agent.sock primary=key

It is a thin relay between the PAM conversation (the login screen, the console, sshd's
keyboard-interactive) and the token-agent service's Unix socket
(``token_agent/service/protocol.py``): it asks the service for a login, shows the person
the service's prompts and messages, sends back the answers and turns the service's outcome
into a PAM return code. Every decision (which factors, which methods, lockouts) is the
service's.

It fails closed: when the service cannot be reached, breaks the protocol, closes the
connection before the login's result, or anything else goes wrong, the answer is an error
(``PAM_AUTHINFO_UNAVAIL`` or ``PAM_AUTH_ERR``), never ``PAM_SUCCESS``.

Module arguments
    ``login_socket=PATH``   the service's socket for root and the login services (default
                            ``/run/token-agent/login.sock``), tried first
    ``socket=PATH``         the service's public socket (default
                            ``/run/token-agent/agent.sock``), used when the login socket is
                            missing or not for this process (ENOENT, EACCES: a screen locker
                            running PAM as the user)
    ``connect_timeout=SECONDS``  how long to keep trying to connect while the service is busy
                            (a full accept backlog, EAGAIN) or restarting (ECONNREFUSED):
                            default 5, within ``timeout``
    ``primary=password|key|card``  the primary factor to ask for (default: the policy's)
    ``timeout=SECONDS``     the whole conversation (default 180)
    ``device=managed|unmanaged``   the kind of device the login happens on (default: the
                            service's ``[workstation]`` setting)
    ``debug``               log the protocol's steps (never a value typed) to syslog

An unknown or malformed argument is a configuration error: ``PAM_SERVICE_ERR``.

It runs in the system's Python 3 embedded by pam_python, not in token-agent's virtualenv,
so it uses the standard library only. The logic is in :func:`authenticate`, which takes a
conversation callable and a socket path, so it can be tested without PAM.

Only ``auth`` is provided: ``pam_sm_setcred`` returns success (there are no credentials to
set), and account management, sessions and password changes return ``PAM_IGNORE``: they stay
with the system's modules (``common-account``, ``common-session``, ...).

Logging: syslog, facility AUTHPRIV, ident ``pam_token_agent``: the user, the service and the
outcome (``ok`` or the failure's reason) of each login. Nothing typed is ever logged.
"""

import errno
import ipaddress
import json
import socket
import struct
import syslog
import time

DEFAULT_SOCKET = "/run/token-agent/agent.sock"
DEFAULT_LOGIN_SOCKET = "/run/token-agent/login.sock"
DEFAULT_TIMEOUT = 180.0
DEFAULT_CONNECT_TIMEOUT = 5.0
#: connecting: errors meaning "no such socket, or not one this process may use": the login
#: socket is then skipped for the public one; the public socket fails at once
_NOT_FOR_US = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                         errno.ENOTSOCK})
#: connecting: errors meaning "busy or restarting": tried again until the connect timeout
_BUSY = frozenset({errno.EAGAIN, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EINTR})
#: a blocking connect waits in line for a full backlog at most this long at a time
_CONNECT_SLICE = 1.0
_RETRY_FIRST, _RETRY_MAX = 0.02, 0.25
PROTOCOL_VERSION = 1
MAX_LINE = 65536  # token_agent.service.protocol.MAX_LINE
#: every send: a service gone away is an error (EPIPE), never SIGPIPE, which would kill the
#: host process (a screen locker running PAM in-process); the host's signal handling is its own
NOSIGNAL = socket.MSG_NOSIGNAL

# what the module returns, by the name of the PAM constant (pamh.<name>)
SUCCESS = "PAM_SUCCESS"
AUTH_ERR = "PAM_AUTH_ERR"
USER_UNKNOWN = "PAM_USER_UNKNOWN"
AUTHINFO_UNAVAIL = "PAM_AUTHINFO_UNAVAIL"
MAXTRIES = "PAM_MAXTRIES"
SERVICE_ERR = "PAM_SERVICE_ERR"

# the conversation's message styles: prompts return the answer (or None), messages nothing
SECRET = "secret"  # PAM_PROMPT_ECHO_OFF
TEXT = "text"  # PAM_PROMPT_ECHO_ON
INFO = "info"  # PAM_TEXT_INFO
ERROR = "error"  # PAM_ERROR_MSG

#: outcome reasons meaning "no more tries" (the method or the key's PIN is locked)
MAXTRIES_REASONS = frozenset({"method-locked", "pin-blocked", "pin-auth-blocked"})
PRIMARY_FACTORS = ("password", "key", "card")
DEVICE_KINDS = ("managed", "unmanaged")
#: the request id of the login.cancel sent when the module's timeout ends a login
CANCEL_ID = 999999
#: answers to a "choose" prompt that are neither a number nor a key: asked again this often
CHOOSE_TRIES = 3

NOT_RUNNING = "token-agent is not running: cannot authenticate (ask IT)"
CLOSED = "token-agent closed the connection before the login finished: cannot authenticate (ask IT)"
BROKEN = "token-agent's answer could not be understood: cannot authenticate (ask IT)"
TIMED_OUT = "The login took too long and was cancelled."
MISCONFIGURED = "The token-agent PAM module is misconfigured: cannot authenticate (ask IT)"
INTERNAL = "The token-agent PAM module failed: cannot authenticate (ask IT)"
FAILED = "Authentication failed."


class UsageError(ValueError):
    """A module argument that is unknown or malformed."""


class Options:
    """The module's arguments (``argv[1:]`` of ``pam_sm_authenticate``)."""

    def __init__(self, socket_path=DEFAULT_SOCKET, primary=None, timeout=DEFAULT_TIMEOUT,
                 device=None, debug=False, login_socket=DEFAULT_LOGIN_SOCKET,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT):
        self.socket = socket_path
        self.login_socket = login_socket
        self.primary = primary
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.device = device
        self.debug = debug

    def __repr__(self):
        return ("Options(socket=%r, login_socket=%r, primary=%r, timeout=%r, "
                "connect_timeout=%r, device=%r, debug=%r)"
                % (self.socket, self.login_socket, self.primary, self.timeout,
                   self.connect_timeout, self.device, self.debug))


def _seconds(name, value, limit):
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= limit:
        raise UsageError("%s= is a number of seconds (at most %d)" % (name, limit))
    return seconds


def parse_args(args):
    """``["socket=/run/x.sock", "primary=key", "debug"]`` -> :class:`Options`.
    Raises :class:`UsageError` for anything it does not know."""
    options = Options()
    for arg in args:
        name, sep, value = arg.partition("=")
        if name == "debug" and not sep:
            options.debug = True
        elif not sep:
            raise UsageError("unknown argument %r" % arg)
        elif name in ("socket", "login_socket"):
            if not value.startswith("/"):
                raise UsageError("%s= needs an absolute path" % name)
            setattr(options, name, value)
        elif name == "primary":
            if value not in PRIMARY_FACTORS:
                raise UsageError("primary= is one of %s" % ", ".join(PRIMARY_FACTORS))
            options.primary = value
        elif name == "device":
            if value not in DEVICE_KINDS:
                raise UsageError("device= is one of %s" % ", ".join(DEVICE_KINDS))
            options.device = value
        elif name == "timeout":
            options.timeout = _seconds(name, value, 86400)
        elif name == "connect_timeout":
            options.connect_timeout = _seconds(name, value, 600)
        else:
            raise UsageError("unknown argument %r" % name)
    return options


class Result:
    """What :func:`authenticate` decided: ``code`` (a PAM constant's name), the outcome's
    ``reason`` (None on success), the authenticated ``user`` on success."""

    def __init__(self, code, reason=None, user=None):
        self.code = code
        self.reason = reason
        self.user = user

    @property
    def ok(self):
        return self.code == SUCCESS

    def __repr__(self):
        return "Result(%s, reason=%r, user=%r)" % (self.code, self.reason, self.user)


def network_of(rhost):
    """PAM_RHOST as the login's network address: an IP address (an IPv4-mapped IPv6
    address as IPv4), or None for a host name, an empty or missing value."""
    if not rhost:
        return None
    text = rhost.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]  # an IPv6 zone ("fe80::1%eth0")
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def choose_message(message, options, default):
    """A "choose" prompt as text for a PAM prompt:

        Second factor (or use a different method)
        1. authenticator app (preferred)
        2. backup codes
        Choose [1]:
    """
    keys = [key for key, _ in options]
    lines = [message.rstrip()] if message and message.strip() else []
    for number, (key, label) in enumerate(options, 1):
        lines.append("%d. %s%s" % (number, label, " (preferred)" if key == default else ""))
    if default in keys:
        lines.append("Choose [%d]: " % (keys.index(default) + 1))
    else:
        lines.append("Choose: ")
    return "\n".join(lines)


def choice(answer, options, default):
    """The option key an answer to a "choose" prompt means: its number (from 1), the key
    itself, or nothing (the default). None when it means none of them."""
    keys = [key for key, _ in options]
    text = (answer or "").strip()
    if not text:
        return default if default in keys else None
    if text.isdigit():
        number = int(text)
        return keys[number - 1] if 1 <= number <= len(keys) else None
    return text if text in keys else None


def prompt_text(message):
    """A service prompt ("Enter the PIN for your security key") as a terminal prompt
    ("Enter the PIN for your security key: ")."""
    text = (message or "").rstrip()
    if not text:
        return "Answer: "
    if text[-1] not in ":?":
        text += ":"
    return text + " "


def clean(value, limit=64):
    """A value safe to put in a log line: printable, no spaces or newlines, bounded."""
    if value is None:
        return "-"
    text = "".join(c if (c.isalnum() or c in "._@+-/:") else "?" for c in str(value))
    return (text[:limit] + "...") if len(text) > limit else (text or "-")


def syslog_log(priority, message):
    """One line to syslog, facility AUTHPRIV. The log is opened and closed around it, so
    the host process's own syslog settings (sshd, gdm, login) are left as they were."""
    try:
        syslog.openlog("pam_token_agent", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        syslog.syslog(syslog.LOG_AUTHPRIV | priority, message)
        syslog.closelog()
    except Exception:  # logging must never decide a login
        pass


class _Failure(Exception):
    """Ends the login with ``result``, showing ``message`` (None: nothing)."""

    def __init__(self, result, message, log_detail):
        Exception.__init__(self, log_detail)
        self.result = result
        self.message = message
        self.log_detail = log_detail


class _Connection:
    """Newline-delimited JSON over the service's socket, with one deadline for all of it."""

    def __init__(self, sock, deadline):
        self.sock = sock
        self.deadline = deadline
        self.buffer = b""
        self.login = None  # the login's id, once known

    def remaining(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Failure(Result(AUTH_ERR, "timeout"), TIMED_OUT, "timed out")
        return left

    def send(self, message):
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8") + b"\n"
        if len(data) > MAX_LINE:
            raise _Failure(Result(AUTH_ERR, "answer-too-long"),
                           "The answer is too long.", "answer too long")
        self.sock.settimeout(self.remaining())
        try:
            self.sock.sendall(data, NOSIGNAL)
        except socket.timeout:
            raise _Failure(Result(AUTH_ERR, "timeout"), TIMED_OUT, "timed out sending")
        except OSError as exc:
            raise _Failure(Result(AUTHINFO_UNAVAIL, "service-closed"), CLOSED,
                           "send failed: %s" % _errno_name(exc))

    def receive(self):
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise _Failure(Result(AUTHINFO_UNAVAIL, "protocol-error"), BROKEN,
                               "line longer than %d bytes" % MAX_LINE)
            self.sock.settimeout(self.remaining())
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise _Failure(Result(AUTH_ERR, "timeout"), TIMED_OUT, "timed out waiting")
            except OSError as exc:
                raise _Failure(Result(AUTHINFO_UNAVAIL, "service-closed"), CLOSED,
                               "receive failed: %s" % _errno_name(exc))
            if not chunk:
                raise _Failure(Result(AUTHINFO_UNAVAIL, "service-closed"), CLOSED,
                               "connection closed before the result")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        if len(line) > MAX_LINE:
            raise _Failure(Result(AUTHINFO_UNAVAIL, "protocol-error"), BROKEN,
                           "line longer than %d bytes" % MAX_LINE)
        try:
            message = json.loads(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError and json's errors are ValueErrors
            message = None
        if not isinstance(message, dict):
            raise _Failure(Result(AUTHINFO_UNAVAIL, "protocol-error"), BROKEN,
                           "not a JSON object")
        return message


def _errno_name(exc):
    return errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__


def _protocol_error(detail):
    return _Failure(Result(AUTHINFO_UNAVAIL, "protocol-error"), BROKEN, detail)


#: an error answer to ``login.start``: its code -> what the module returns
_START_ERRORS = {
    "not-found": USER_UNKNOWN,
    "unavailable": AUTHINFO_UNAVAIL,
    "internal": AUTHINFO_UNAVAIL,
}


def authenticate(conversation, socket_path=DEFAULT_SOCKET, user=None, service=None,
                 rhost=None, options=None, log=syslog_log):
    """One login through the service at ``socket_path``; returns a :class:`Result`.

    ``conversation(style, text)``: ``style`` is :data:`SECRET` or :data:`TEXT` (a prompt:
    return the answer, or None for no answer) or :data:`INFO` / :data:`ERROR` (a message:
    the return value is ignored). ``log(priority, line)`` records the outcome (default:
    syslog AUTHPRIV); it never receives anything typed.
    """
    options = options or Options(socket_path=socket_path)
    deadline = time.monotonic() + options.timeout
    debug = (lambda text: log(syslog.LOG_DEBUG, text)) if options.debug else (lambda text: None)
    who = "user=%s service=%s" % (clean(user), clean(service))
    sock = connection = None
    try:
        sock = _connect([options.login_socket, socket_path], deadline,
                        min(deadline, time.monotonic() + options.connect_timeout), debug)
        connection = _Connection(sock, deadline)
        result = _login(connection, conversation, user=user, service=service,
                        network=network_of(rhost), options=options, debug=debug)
    except _Failure as failure:
        result = failure.result
        if failure.message:
            _say(conversation, ERROR, failure.message)
        if result.reason == "timeout" and connection is not None:
            _cancel(connection)
        log(syslog.LOG_NOTICE if result.code != AUTHINFO_UNAVAIL else syslog.LOG_ERR,
            "%s outcome=%s (%s)" % (who, clean(result.reason), failure.log_detail))
        return result
    finally:
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
    if result.ok:
        log(syslog.LOG_INFO, "%s outcome=ok user=%s" % (who, clean(result.user)))
    else:
        log(syslog.LOG_NOTICE, "%s outcome=%s" % (who, clean(result.reason)))
    return result


def _say(conversation, style, text):
    try:
        conversation(style, text)
    except Exception:
        pass


def _cancel(connection):
    """Best effort: ask the service to cancel the login (closing the connection, which
    follows, cancels it too)."""
    if connection.login is None:
        return
    try:
        data = json.dumps({"id": CANCEL_ID, "op": "login.cancel", "login": connection.login})
        connection.sock.settimeout(0.5)
        connection.sock.sendall(data.encode("utf-8") + b"\n", NOSIGNAL)
    except (OSError, TypeError, ValueError):
        pass


def _connect(paths, deadline, connect_deadline, debug):
    """A connection to the first of ``paths`` (the login socket, then the public one) that
    exists and is this process's to use. A busy service (a full accept backlog: EAGAIN) or
    one restarting (ECONNREFUSED) is tried again, with a short backoff, until
    ``connect_deadline``: an unprivileged flood of the public socket delays a login, it
    does not fail it at once. Then it fails closed."""
    failures = []
    for path in [p for i, p in enumerate(paths) if p and p not in paths[:i]]:
        try:
            sock = _connect_one(path, connect_deadline)
        except OSError as exc:
            failures.append("%s: %s" % (clean(path, 200), _errno_name(exc)))
            if exc.errno in _NOT_FOR_US:
                continue  # not there, or not ours: the next socket
            break  # busy until the connect timeout: fail closed
        except ValueError:
            failures.append("%s: bad socket path" % clean(path, 200))
            break
        debug("connected to %s" % clean(path, 200))
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        return sock
    raise _Failure(Result(AUTHINFO_UNAVAIL, "service-unavailable"), NOT_RUNNING,
                   "cannot connect to %s" % ", ".join(failures))


def _connect_one(path, deadline):
    """Connect to ``path``, waiting in line while its backlog is full, retrying EAGAIN and
    ECONNREFUSED until ``deadline``. Raises the last ``OSError``."""
    delay = _RETRY_FIRST
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # a blocking connect sleeps until the listener accepts or SO_SNDTIMEO runs out
            # (then EAGAIN); a socket with a Python timeout would fail at once with EAGAIN
            sock.settimeout(None)  # blocking, whatever the host's default timeout
            wait = max(0.001, min(_CONNECT_SLICE, deadline - time.monotonic()))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(wait))
            sock.connect(path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            return sock
        except OSError as exc:
            sock.close()
            error = exc.errno if exc.errno is not None else errno.ETIMEDOUT
            left = deadline - time.monotonic()
            if error not in _BUSY or left <= 0:
                raise
            if error != errno.EAGAIN:  # EAGAIN has waited its slice already
                time.sleep(min(delay, left))
                delay = min(_RETRY_MAX, delay * 2)
        except BaseException:
            sock.close()
            raise


def _timeval(seconds):
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1000000))


def _login(connection, conversation, user, service, network, options, debug):
    connection.send({"id": 1, "op": "hello"})
    hello = _response(connection, 1)
    if not hello.get("ok"):
        error = hello.get("error") or {}
        raise _Failure(Result(AUTHINFO_UNAVAIL, "service-error"),
                       _service_message(error) or BROKEN,
                       "hello refused: %s" % clean(error.get("code")))
    version = (hello.get("result") or {}).get("version")
    if version != PROTOCOL_VERSION:
        raise _protocol_error("service speaks protocol version %s, not %d"
                              % (clean(version), PROTOCOL_VERSION))
    device = None
    if options.device is not None or network is not None:
        device = {"kind": options.device, "device_id": None, "network": network}
    connection.send({"id": 2, "op": "login.start", "user": user, "primary": options.primary,
                     "second": None, "device": device, "service": service})
    debug("login.start sent (primary=%s device=%s network=%s)"
          % (clean(options.primary), clean(options.device), clean(network)))
    pending = {2: "login.start"}
    next_id = 3
    login_id = None
    while True:
        message = connection.receive()
        if "id" in message and "event" not in message:
            op = pending.pop(message.get("id"), None)
            if op is None:
                raise _protocol_error("answer to a request never sent")
            if message.get("ok") is True:
                if op == "login.start":
                    login_id = (message.get("result") or {}).get("login")
                    if login_id is None:
                        raise _protocol_error("login.start without a login id")
                    connection.login = login_id
                continue
            error = message.get("error") or {}
            code = error.get("code")
            if op == "login.start":
                result = Result(_START_ERRORS.get(code, AUTH_ERR), "service-" + str(code))
            else:
                result = Result(AUTH_ERR, "service-" + str(code))
            raise _Failure(result, _service_message(error) or FAILED,
                           "%s refused: %s" % (op, clean(code)))
        event = message.get("event")
        if not isinstance(event, str):
            raise _protocol_error("neither an answer nor an event")
        if login_id is not None and message.get("login") != login_id:
            debug("event %s of another login ignored" % clean(event))
            continue
        if connection.login is None:  # an event can come before login.start's answer
            connection.login = message.get("login")
        if event == "prompt":
            kind = message.get("kind")
            debug("prompt (%s)" % clean(kind))
            value = _ask(conversation, message)
            connection.remaining()  # the person took too long: cancelled, not sent
            connection.send({"id": next_id, "op": "login.answer", "login": message.get("login"),
                             "prompt": message.get("prompt"), "value": value})
            pending[next_id] = "login.answer"
            next_id += 1
            del value
        elif event == "info":
            debug("info")
            _say(conversation, INFO, str(message.get("message") or ""))
        elif event == "qr":
            debug("qr")
            _say(conversation, INFO, str(message.get("text") or message.get("uri") or ""))
        elif event == "result":
            outcome = message.get("outcome")
            if not isinstance(outcome, dict):
                raise _protocol_error("result without an outcome")
            debug("result")
            return _result(conversation, outcome, user)
        else:
            debug("event %s ignored" % clean(event))


def _response(connection, request_id):
    """The answer to request ``request_id`` (events before it are not expected: refused)."""
    message = connection.receive()
    if message.get("id") != request_id or "event" in message:
        raise _protocol_error("expected the answer to request %d" % request_id)
    return message


def _service_message(error):
    text = error.get("message") if isinstance(error, dict) else None
    return "token-agent: %s" % text if isinstance(text, str) and text else None


def _ask(conversation, prompt):
    """The answer to one prompt event, or None (no answer: the login ends as cancelled)."""
    kind = prompt.get("kind")
    if prompt.get("prompt") is None:
        raise _protocol_error("prompt without an id")
    if kind == "secret":
        return _answer(conversation, SECRET, prompt_text(prompt.get("message")))
    if kind == "text":
        return _answer(conversation, TEXT, prompt_text(prompt.get("message")))
    if kind == "choose":
        options = prompt.get("options")
        if (not isinstance(options, list) or not options
                or not all(isinstance(o, (list, tuple)) and len(o) == 2 for o in options)):
            raise _protocol_error("choose prompt without options")
        options = [(str(key), str(label)) for key, label in options]
        default = prompt.get("default")
        text = choose_message(str(prompt.get("message") or ""), options, default)
        for _ in range(CHOOSE_TRIES):
            answer = _answer(conversation, TEXT, text)
            if answer is None:
                return None
            chosen = choice(answer, options, default)
            if chosen is not None:
                return chosen
            _say(conversation, ERROR, "Not one of the choices: type its number.")
        return None
    raise _protocol_error("prompt of unknown kind")


def _answer(conversation, style, text):
    try:
        answer = conversation(style, text)
    except Exception:  # a conversation error is no answer
        return None
    return answer if isinstance(answer, str) else None


def _result(conversation, outcome, requested_user):
    if outcome.get("ok") is True:
        user = outcome.get("user")
        if not isinstance(user, str) or not user:
            raise _protocol_error("successful outcome without a user")
        if requested_user and user != requested_user:
            # never let a login for one user authenticate another
            raise _Failure(Result(AUTH_ERR, "credential-of-another-user"),
                           "token-agent: that was a login as %s, not %s." % (user, requested_user),
                           "outcome for another user")
        return Result(SUCCESS, None, user)
    reason = outcome.get("reason")
    reason = reason if isinstance(reason, str) and reason else "failed"
    if reason == "unknown-user":
        code = USER_UNKNOWN
    elif reason in MAXTRIES_REASONS:
        code = MAXTRIES
    else:
        code = AUTH_ERR
    message = outcome.get("message")
    if reason == "unknown-user":
        # say no more to whoever is at the prompt than for a wrong answer: which user names
        # exist is not theirs to learn (the PAM stack still gets PAM_USER_UNKNOWN)
        message = None
    _say(conversation, ERROR, message if isinstance(message, str) and message else FAILED)
    return Result(code, reason)


# -- the PAM entry points (pam_python) -------------------------------------------------------


def _pam_conversation(pamh, silent):
    styles = {
        SECRET: pamh.PAM_PROMPT_ECHO_OFF,
        TEXT: pamh.PAM_PROMPT_ECHO_ON,
        INFO: pamh.PAM_TEXT_INFO,
        ERROR: pamh.PAM_ERROR_MSG,
    }

    def conversation(style, text):
        if silent and style in (INFO, ERROR):
            return None
        response = pamh.conversation(pamh.Message(styles[style], text))
        if style in (SECRET, TEXT):
            return getattr(response, "resp", None)
        return None

    return conversation


def _pam_user(pamh):
    try:
        user = pamh.get_user(None)
    except Exception:  # the application could not say: a usernameless login
        return None
    return user or None


def pam_sm_authenticate(pamh, flags, argv):
    conversation = _pam_conversation(pamh, bool(flags & pamh.PAM_SILENT))
    try:
        options = parse_args(list(argv[1:]))
    except UsageError as exc:
        syslog_log(syslog.LOG_ERR, "bad module arguments: %s" % exc)
        _say(conversation, ERROR, MISCONFIGURED)
        return pamh.PAM_SERVICE_ERR
    try:
        user = _pam_user(pamh)
        result = authenticate(conversation, options.socket, user=user,
                              service=pamh.service, rhost=pamh.rhost, options=options)
        if result.ok and not user:
            pamh.user = result.user  # a usernameless login: whoever tapped the key
        code = getattr(pamh, result.code)
        return code if result.ok or code != pamh.PAM_SUCCESS else pamh.PAM_AUTH_ERR
    except Exception as exc:  # never success, never a traceback to the person
        syslog_log(syslog.LOG_ERR, "internal error: %s" % type(exc).__name__)
        _say(conversation, ERROR, INTERNAL)
        return pamh.PAM_AUTH_ERR


def pam_sm_setcred(pamh, flags, argv):
    return pamh.PAM_SUCCESS


def pam_sm_acct_mgmt(pamh, flags, argv):
    return pamh.PAM_IGNORE  # account checks stay with the system's modules


def pam_sm_open_session(pamh, flags, argv):
    return pamh.PAM_IGNORE


def pam_sm_close_session(pamh, flags, argv):
    return pamh.PAM_IGNORE


def pam_sm_chauthtok(pamh, flags, argv):
    return pamh.PAM_IGNORE
