// imgsift web UI: plain JavaScript over the REST API (/v1). Two views, chosen by the URL hash:
//   #/           new job form and the list of jobs
//   #/jobs/ID    live progress (server-sent events), threshold slider, histogram, "Ask me" questions,
//                gallery, exports

const KEYWORD_SOURCES = ["openverse", "wikimedia", "bing", "duckduckgo", "flickr"];
const EXPORTS = [
  ["imagefolder", "ImageFolder zip"], ["yolo", "YOLO dataset"], ["coco", "COCO JSON"],
  ["webdataset", "WebDataset shards"], ["huggingface", "Hugging Face dataset"],
  ["fiftyone", "FiftyOne dataset"], ["labelstudio", "Label Studio tasks"],
  ["jsonl", "manifest JSONL"], ["csv", "manifest CSV"], ["parquet", "manifest Parquet"],
];
const ASK_BATCH = 5;  // questions fetched at a time by the "Ask me" panel
const view = document.getElementById("view");
let cleanup = () => {};

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (response.status === 401) {
    showSignIn("Your API key was refused (revoked?). Sign in again.");
    throw new Error("401: not signed in");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = JSON.stringify((await response.json()).detail); } catch { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response.status === 204 ? null : response.json();
}

function render(templateId) {
  cleanup();
  cleanup = () => {};
  view.replaceChildren(document.getElementById(templateId).content.cloneNode(true));
}

async function route() {
  // Signed in = the API accepts the HttpOnly session cookie that POST /v1/session set.
  const me = await fetch("/v1/session");
  if (me.status === 401) { showSignIn(); return; }
  const key = await me.json();
  const who = document.getElementById("who");
  who.replaceChildren(`key: ${key.name}${key.admin ? " (admin)" : ""} · `);
  const out = document.createElement("a");
  out.href = "#/";
  out.id = "sign-out";
  out.textContent = "sign out";
  out.addEventListener("click", async (event) => {
    event.preventDefault();
    await fetch("/v1/session", { method: "DELETE" });
    who.replaceChildren();
    showSignIn();
  });
  who.append(out);
  const match = location.hash.match(/^#\/jobs\/([0-9a-f]{32})$/);
  if (match) showJob(match[1]); else showHome();
}

function showSignIn(message = "") {
  render("signin-view");
  document.getElementById("signin-error").textContent = message;
  document.getElementById("signin").addEventListener("submit", async (event) => {
    event.preventDefault();
    const response = await fetch("/v1/session", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ api_key: event.target.api_key.value.trim() }),
    });
    if (response.ok) route();
    else document.getElementById("signin-error").textContent = "That key is not known to this imgsift.";
  });
}
window.addEventListener("hashchange", route);
route();

// ------------------------------------------------------------------ home: new job + list

function showHome() {
  render("home");
  const sources = document.getElementById("keyword-sources");
  for (const kind of KEYWORD_SOURCES) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" name="kw" value="${kind}"> ${kind}`;
    sources.append(label);
  }
  const refs = fileBox("refs-drop", "refs", "refs-list");
  const negatives = fileBox("neg-drop", "negatives", "neg-list");
  document.getElementById("new-job").addEventListener("submit", (event) => {
    event.preventDefault();
    createJob(event.target, refs.files, negatives.files);
  });
  loadJobs();
}

function fileBox(dropId, inputId, listId) {
  const box = { files: [] };
  const drop = document.getElementById(dropId);
  const list = document.getElementById(listId);
  const add = (files) => {
    box.files.push(...[...files].filter((f) => f.type.startsWith("image/")));
    list.textContent = box.files.map((f) => f.name).join(", ");
  };
  document.getElementById(inputId).addEventListener("change", (e) => add(e.target.files));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); add(e.dataTransfer.files); });
  return box;
}

async function createJob(form, refs, negatives) {
  const error = document.getElementById("form-error");
  error.textContent = "";
  const data = new FormData(form);
  const sources = [];
  const urls = data.get("urls").split(/\s+/).filter(Boolean);
  if (urls.length) sources.push({ kind: "urls", urls });
  if (data.get("site")) sources.push({ kind: "site", start_urls: [data.get("site")] });
  for (const kind of data.getAll("kw")) sources.push({ kind });
  const spec = { target: data.get("target"), threshold: Number(data.get("threshold")), sources };
  if (data.get("query")) spec.query = data.get("query");
  if (!sources.length) { error.textContent = "give at least one source"; return; }
  if (!refs.length) { error.textContent = "add at least one reference image"; return; }
  const body = new FormData();
  body.append("spec", JSON.stringify(spec));
  for (const file of refs) body.append("references", file, file.name);
  for (const file of negatives) body.append("negatives", file, file.name);
  try {
    const job = await api("/v1/jobs", { method: "POST", body });
    location.hash = `#/jobs/${job.id}`;
  } catch (e) {
    error.textContent = e.message;
  }
}

async function loadJobs() {
  const { items } = await api("/v1/jobs?limit=50");
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...items.map((job) => {
    const row = document.createElement("tr");
    row.innerHTML = `<td><a href="#/jobs/${job.id}"><code>${job.id.slice(0, 8)}</code></a></td>
      <td>${escape(job.spec.target)}</td><td><span class="state">${job.state}</span></td>
      <td>${Math.round(job.progress * 100)}%</td><td>${job.counts.accepted}</td>
      <td>${new Date(job.created_at).toLocaleString()}</td>`;
    return row;
  }));
}

// ------------------------------------------------------------------ job page

function showJob(id) {
  render("job");
  const page = { id, status: null, crops: [], marks: new Map(), threshold: null, compared: -1 };
  document.getElementById("job-id").textContent = id;
  const slider = document.getElementById("threshold");
  slider.addEventListener("input", () => setThreshold(page, Number(slider.value)));
  slider.addEventListener("change", () => saveThreshold(page));
  document.getElementById("use-suggested").addEventListener("click", () => {
    const suggested = page.status?.calibration.suggested_threshold;
    if (suggested != null) { slider.value = suggested; setThreshold(page, suggested); saveThreshold(page); }
  });
  document.getElementById("train").addEventListener("click", async () => {
    page.status = await api(`/v1/jobs/${id}/train`, { method: "POST" });
    showStatus(page);
  });
  for (const [format, label] of EXPORTS) {
    const button = document.createElement("button");
    button.type = "button";
    button.id = `export-${format}`;
    button.textContent = label;
    button.addEventListener("click", () => exportAs(page, format, button));
    document.getElementById("exports").append(button);
  }

  const stopAsking = setupAsk(page);

  const events = new EventSource(`/v1/jobs/${id}/events`);
  events.addEventListener("status", (e) => onStatus(page, JSON.parse(e.data)));
  events.addEventListener("end", () => {
    events.close();
    refillQuestions(page, true);  // the questions asked while the job ran were chosen among fewer crops
    loadCrops(page);
  });
  cleanup = () => { events.close(); stopAsking(); };
}

function onStatus(page, status) {
  page.status = status;
  if (page.threshold === null) {
    page.threshold = status.threshold;
    document.getElementById("threshold").value = status.threshold;
  }
  showStatus(page);
  if (status.counts.compared !== page.compared) {
    page.compared = status.counts.compared;
    loadCrops(page);
  }
}

function showStatus(page) {
  const s = page.status;
  const state = document.getElementById("job-state");
  state.textContent = s.state;
  state.dataset.state = s.state;
  document.getElementById("stages").innerHTML = Object.entries(s.stages).map(([name, stage]) => {
    const fraction = stage.total ? Math.min(1, stage.done / stage.total) : (stage.state === "done" ? 1 : 0);
    return `<div class="stage" data-stage="${name}"><span>${name}</span>
      <div class="bar"><div style="width:${Math.round(fraction * 100)}%"></div></div>
      <span>${stage.done}${stage.total != null ? " / " + stage.total : ""} · ${stage.state}</span></div>`;
  }).join("") + `<p class="notes">overall ${Math.round(s.progress * 100)}% · ${s.counts.downloaded} images,
    ${s.counts.duplicates} duplicates, ${s.counts.failed} failed, ${s.counts.crops} crops</p>`;
  document.getElementById("notes").textContent = s.notes.join(" · ");
  document.getElementById("model").textContent = s.model.training
    ? "training…" : (s.model.version ? `fine-tuned head v${s.model.version}` : "pretrained embedding");
  showCalibration(page);
}

function showCalibration(page) {
  const cal = page.status.calibration;
  const est = [cal.precision, cal.recall].every((v) => v != null)
    ? `estimated at the job's threshold ${page.status.threshold}: precision ${cal.precision.toFixed(2)},
       recall ${cal.recall.toFixed(2)}` : "estimates appear once the job has two references and crops";
  document.getElementById("estimates").textContent = `${est} · ${cal.basis} · marked ${cal.marked_right} right,
    ${cal.marked_wrong} wrong`;
  document.getElementById("suggested").textContent = cal.suggested_threshold ?? "–";
  showAskCalibration(cal);
  drawHistogram(page);
}

function drawHistogram(page) {
  const svg = document.getElementById("histogram");
  const { edges, counts } = page.status.calibration.histogram;
  const max = Math.max(1, ...counts);
  const width = 400 / counts.length;
  const x = (d) => (d / edges[edges.length - 1]) * 400;
  const bars = counts.map((c, i) => {
    const h = (c / max) * 95;
    return `<rect x="${i * width}" y="${100 - h}" width="${width - 1}" height="${h}" fill="#94a3b8"><title>${edges[i]}–${edges[i + 1]}: ${c}</title></rect>`;
  });
  const suggested = page.status.calibration.suggested_threshold;
  if (suggested != null) bars.push(`<line id="suggested-line" x1="${x(suggested)}" x2="${x(suggested)}" y1="0" y2="100" stroke="#2563eb" stroke-dasharray="3 2" />`);
  bars.push(`<line id="threshold-line" x1="${x(page.threshold)}" x2="${x(page.threshold)}" y1="0" y2="100" stroke="#b3261e" stroke-width="2" />`);
  svg.innerHTML = bars.join("");
}

async function loadCrops(page) {
  const crops = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: "500", threshold: "2" });
    if (cursor) query.set("cursor", cursor);
    const body = await api(`/v1/jobs/${page.id}/crops?${query}`);
    crops.push(...body.items);
    cursor = body.next_cursor;
  } while (cursor && crops.length < 20000);
  page.crops = crops;
  renderGallery(page);
  refillQuestions(page);
}

function renderGallery(page) {
  const gallery = document.getElementById("gallery");
  gallery.replaceChildren(...page.crops.map((crop) => {
    const tile = document.createElement("div");
    tile.className = "crop";
    tile.dataset.cropId = crop.crop_id;
    tile.dataset.distance = crop.distance;
    const p = crop.provenance || {};
    tile.title = [`distance ${crop.distance.toFixed(3)} · ${crop.class} (${crop.score.toFixed(2)})`,
      `source: ${p.source ?? "?"}`, `image: ${p.image_url ?? "?"}`, `page: ${p.page_url ?? "–"}`,
      `licence: ${p.license ?? "unknown"}`, `author: ${p.author ?? "unknown"}`].join("\n");
    tile.innerHTML = `<img loading="lazy" src="${crop.crop_url}" alt=""><span class="d">${crop.distance.toFixed(3)}</span>`;
    tile.addEventListener("click", () => mark(page, crop, tile));
    markClass(tile, page.marks.get(crop.crop_id));
    return tile;
  }));
  setThreshold(page, page.threshold ?? page.status?.threshold ?? 0.9);
}

function setThreshold(page, threshold) {
  page.threshold = threshold;
  document.getElementById("threshold-value").textContent = threshold.toFixed(3);
  let accepted = 0;
  for (const tile of document.querySelectorAll("#gallery .crop")) {
    const ok = Number(tile.dataset.distance) <= threshold;
    accepted += ok;
    tile.classList.toggle("accepted", ok);
    tile.classList.toggle("rejected", !ok);
  }
  document.getElementById("accepted-count").textContent = accepted;
  document.getElementById("rejected-count").textContent = page.crops.length - accepted;
  if (page.status) drawHistogram(page);
}

async function saveThreshold(page) {
  page.status = await api(`/v1/jobs/${page.id}`, {
    method: "PATCH", headers: { "content-type": "application/json" },
    body: JSON.stringify({ threshold: page.threshold }),
  });
  showStatus(page);
}

async function mark(page, crop, tile) {
  const order = [undefined, true, false];  // none -> right -> wrong -> none
  const next = order[(order.indexOf(page.marks.get(crop.crop_id)) + 1) % order.length];
  const calibration = await api(`/v1/jobs/${page.id}/crops/${crop.crop_id}/feedback`, {
    method: "PUT", headers: { "content-type": "application/json" },
    body: JSON.stringify({ correct: next ?? null }),
  });
  if (next === undefined) page.marks.delete(crop.crop_id); else page.marks.set(crop.crop_id, next);
  markClass(tile, next);
  if (next !== undefined && page.ask.current?.crop_id === crop.crop_id && !page.ask.busy) nextQuestion(page);
  page.status.calibration = calibration;
  showCalibration(page);
  const p = crop.provenance || {};
  const details = document.getElementById("details");
  details.hidden = false;
  const pageUrl = /^https?:\/\//i.test(p.page_url ?? "") ? p.page_url : null;
  details.innerHTML = `<b>${escape(crop.crop_id)}</b> · distance ${crop.distance.toFixed(3)} · ${escape(crop.class)} ·
    <a href="${escape(crop.original_url)}" target="_blank">original</a> · source ${escape(p.source ?? "?")} ·
    licence ${escape(p.license ?? "unknown")} · author ${escape(p.author ?? "unknown")} ·
    page ${pageUrl ? `<a href="${escape(pageUrl)}" target="_blank" rel="noreferrer">${escape(pageUrl)}</a>`
      : escape(p.page_url ?? "–")}`;
}

function markClass(tile, value) {
  tile.classList.toggle("marked-right", value === true);
  tile.classList.toggle("marked-wrong", value === false);
}

// ------------------------------------------------------------------ "Ask me": one question at a time
// GET /questions gives the crops whose answers the job needs most, ASK_BATCH at a time; each answer is
// a PUT .../feedback whose calibration replaces the page's (suggested threshold, estimates, histogram).
// The image carries data-crop-id only while its question can be answered (not while an answer is sent).

function setupAsk(page) {
  page.ask = { current: null, queue: [], loading: false, again: false, busy: false, error: "" };
  document.getElementById("ask-right").addEventListener("click", () => answer(page, true));
  document.getElementById("ask-wrong").addEventListener("click", () => answer(page, false));
  const onKey = (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat || typing(event.target)) return;
    const key = event.key.toLowerCase();
    if (key !== "y" && key !== "n") return;
    event.preventDefault();
    answer(page, key === "y");
  };
  document.addEventListener("keydown", onKey);
  showQuestion(page);
  return () => document.removeEventListener("keydown", onKey);
}

const NOT_TYPED = new Set(["range", "checkbox", "radio", "button", "submit", "reset", "file", "color", "image"]);

function typing(element) {
  if (!(element instanceof Element)) return false;
  if (element.isContentEditable || element.tagName === "TEXTAREA" || element.tagName === "SELECT") return true;
  return element.tagName === "INPUT" && !NOT_TYPED.has(element.type);
}

function refillQuestions(page, fresh = false) {
  const ask = page.ask;
  if (fresh) ask.queue = [];
  if (ask.loading) { ask.again ||= fresh; return; }
  if (!ask.current && !ask.busy) loadQuestions(page);
}

async function loadQuestions(page) {
  const ask = page.ask;
  if (ask.loading) { ask.again = true; return; }
  ask.loading = true;
  showQuestion(page);
  let items = [];
  try {
    items = (await api(`/v1/jobs/${page.id}/questions?limit=${ASK_BATCH}`)).items;
    ask.error = "";
  } catch (e) {
    ask.error = `could not fetch questions: ${e.message}`;
  }
  ask.loading = false;
  if (ask.again) { ask.again = false; loadQuestions(page); return; }
  // An answer given while the batch was on its way (here or in the gallery) is not asked again.
  ask.queue = items.filter((c) => !page.marks.has(c.crop_id) && c.crop_id !== ask.current?.crop_id);
  if (!ask.current && !ask.busy) ask.current = ask.queue.shift() ?? null;
  showQuestion(page);
}

function nextQuestion(page) {
  const ask = page.ask;
  ask.queue = ask.queue.filter((c) => !page.marks.has(c.crop_id));
  ask.current = ask.queue.shift() ?? null;
  if (ask.current) showQuestion(page); else loadQuestions(page);
}

async function answer(page, correct) {
  const ask = page.ask;
  const crop = ask.current;
  if (!crop || ask.busy || !page.status) return;
  ask.busy = true;
  showQuestion(page);
  try {
    const calibration = await api(`/v1/jobs/${page.id}/crops/${encodeURIComponent(crop.crop_id)}/feedback`, {
      method: "PUT", headers: { "content-type": "application/json" },
      body: JSON.stringify({ correct }),
    });
    ask.error = "";
    page.marks.set(crop.crop_id, correct);
    const tile = document.querySelector(`#gallery .crop[data-crop-id="${CSS.escape(crop.crop_id)}"]`);
    if (tile) markClass(tile, correct);
    page.status.calibration = calibration;
    showCalibration(page);
    ask.current = null;
  } catch (e) {
    ask.error = `the answer was not saved: ${e.message}`;
    if (e.message.startsWith("409") || e.message.startsWith("404")) ask.current = null;  // not askable: skip it
  }
  ask.busy = false;
  if (ask.current) showQuestion(page); else nextQuestion(page);
}

function showQuestion(page) {
  const ask = page.ask;
  const crop = ask.current;
  const ready = Boolean(crop) && !ask.busy;
  const image = document.getElementById("ask-image");
  document.getElementById("ask-right").disabled = !ready;
  document.getElementById("ask-wrong").disabled = !ready;
  if (crop) {
    if (image.getAttribute("src") !== crop.crop_url) image.src = crop.crop_url;
    image.hidden = false;
    document.getElementById("ask-meta").textContent =
      `distance ${crop.distance.toFixed(3)} · ${crop.class ?? "?"} (score ${crop.score.toFixed(2)})`;
  } else {
    image.hidden = true;
    image.removeAttribute("src");
    document.getElementById("ask-meta").textContent = "";
  }
  if (ready) image.dataset.cropId = crop.crop_id; else delete image.dataset.cropId;
  const running = !page.status || page.status.state === "queued" || page.status.state === "running";
  document.getElementById("ask-status").textContent = crop ? ""
    : ask.loading || ask.busy ? "loading questions…"
    : running ? "No crop is ready to ask about yet: questions come as the crops are compared."
    : "No questions left: every crop the job would ask about is answered.";
  document.getElementById("ask-error").textContent = ask.error;
}

function estimate(name, value, interval) {
  if (value == null) return `${name} –`;
  const range = interval ? ` (${interval[0].toFixed(2)}–${interval[1].toFixed(2)})` : "";
  return `${name} ${value.toFixed(2)}${range}`;
}

function showAskCalibration(cal) {
  document.getElementById("ask-count").textContent = cal.answers;
  document.getElementById("ask-suggested").textContent = cal.suggested_threshold ?? "–";
  const at = cal.at_suggested;
  const intervals = at?.precision_interval || at?.recall_interval ? " (80% intervals)" : "";
  document.getElementById("ask-estimates").textContent = at
    ? `estimated at the suggestion ${at.threshold}: ${estimate("precision", at.precision, at.precision_interval)} · `
      + `${estimate("recall", at.recall, at.recall_interval)}${intervals}`
    : "estimates appear once the job has crops";
  document.getElementById("ask-basis").textContent = cal.basis;
  const needs = document.getElementById("ask-needs");
  needs.hidden = !cal.needs_answers;
  needs.textContent = "answers needed: nothing separates the crops yet, so the suggestion accepts every crop; "
    + "a few right and wrong answers will settle the threshold.";
}

async function exportAs(page, format, button) {
  button.disabled = true;
  const label = button.textContent;
  button.textContent = `${label}: building…`;
  try {
    let job = await api(`/v1/jobs/${page.id}/exports`, {
      method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ format, threshold: page.threshold }),
    });
    while (job.state === "queued" || job.state === "running") {
      await new Promise((resolve) => setTimeout(resolve, 500));
      job = await api(`/v1/jobs/${page.id}/exports/${job.id}`);
    }
    if (job.state !== "done") throw new Error(job.error || job.state);
    const link = document.createElement("a");
    link.href = job.download_url;
    link.id = `download-${format}`;
    link.textContent = `${label} (${job.crops} crops)`;
    if (job.note) link.title = job.note;  // an empty export is valid; say why it is empty
    link.setAttribute("download", "");
    button.replaceWith(link);
    link.click();
  } catch (e) {
    button.textContent = `${label}: ${e.message}`;
    button.disabled = false;
  }
}

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
