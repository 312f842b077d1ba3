// The "Waiting for you to confirm" page of a sign-in (a push approval, a phone call): asks the
// server whether the sign-in has moved on (a long poll: the server answers when it has, or
// after a few seconds), then opens its next step. Without JavaScript, "Check again" does it.
// No timed refresh of the page itself (WCAG 2.2.1): it changes only when the sign-in does.
(function () {
  "use strict";
  async function poll() {
    try {
      const response = await fetch("/account/sign-in/status", {
        credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" },
      });
      if (response.ok) {
        const state = await response.json();
        if (state.ready) {
          window.location.replace("/account/sign-in/step");
          return;
        }
      } else {
        await new Promise((resolve) => setTimeout(resolve, 3000));
      }
    } catch (error) {
      await new Promise((resolve) => setTimeout(resolve, 3000));
    }
    setTimeout(poll, 100);
  }
  poll();
})();
