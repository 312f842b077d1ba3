// The NHS.UK frontend's components (error summary focus, header menu, radios, skip link).
// Loaded as a module from every page; the pages work without it.
import { initAll } from "/assets/nhsuk/nhsuk-frontend.min.js";

document.body.classList.add("js-enabled", "nhsuk-frontend-supported");
initAll();
