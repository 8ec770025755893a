// The imgsvc console: every action is a call of the public API, with the pasted bearer token if any.
import { placeholderStyle } from "./thumbhash.js";

const TOKEN_KEY = "imgsvc-console-token";
const SIZES = "(max-width: 640px) 100vw, 640px";
const $ = (id) => document.getElementById(id);
const state = { images: new Map(), selected: null, cursor: null, preview: null, thumbnails: [] };

const token = () => sessionStorage.getItem(TOKEN_KEY) || "";
const authHeaders = () => (token() ? { Authorization: `Bearer ${token()}` } : {});

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

/** the path and query of an API URL, fetched from this origin (the CSP allows no other) */
function local(url) {
  const parsed = new URL(url, location.href);
  return parsed.pathname + parsed.search;
}

async function problemText(response) {
  try {
    const problem = await response.json();
    return problem.detail || problem.title || `${response.status}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) throw new Error(`${await problemText(response)}: paste a token above`);
  if (!response.ok) throw new Error(await problemText(response));
  return response;
}

/** [{url, w}] of the image JSON's ready-made srcset */
function candidates(image) {
  return image.srcset.split(",").map((part) => {
    const [url, width] = part.trim().split(/\s+/);
    return { url, w: parseInt(width, 10) };
  });
}

// ---------------------------------------------------------------- upload

function uploadFile(file) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/images");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (event) => {
      if (!event.lengthComputable) return;
      $("progress").value = event.loaded / event.total;
      $("progress-text").textContent = `${file.name}: ${Math.round((100 * event.loaded) / event.total)}%`;
    });
    xhr.addEventListener("load", () => {
      if (xhr.status === 201) resolve(xhr.response);
      else reject(new Error(`${file.name}: ${xhr.response?.detail || `HTTP ${xhr.status}`}`));
    });
    xhr.addEventListener("error", () => reject(new Error(`${file.name}: the upload failed (network)`)));
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("visibility", $("visibility").value);
    if ($("category").value.trim()) form.append("category", $("category").value.trim());
    xhr.send(form);
  });
}

async function uploadAll(files) {
  $("progress").hidden = false;
  for (const file of files) {
    $("progress").value = 0;
    try {
      const image = await uploadFile(file);
      addTile(image, true);
      select(image.id);
      say(`Uploaded ${file.name}: ${image.id} (${image.width} × ${image.height} ${image.format})`);
    } catch (error) {
      say(error.message, true);
    }
  }
  $("progress").hidden = true;
  $("progress-text").textContent = "";
}

// ---------------------------------------------------------------- grid

async function loadImages(more = false) {
  const params = new URLSearchParams({ owner: "me", limit: "24" });
  if (more && state.cursor) params.set("cursor", state.cursor);
  const page = await (await api(`/images?${params}`)).json();
  if (!more) clearGrid();
  for (const image of page.items) addTile(image, false);
  state.cursor = page.next_cursor;
  $("more").hidden = !state.cursor;
  if (!more) say(page.items.length ? "" : "No images yet: drop one above.");
}

function clearGrid() {
  state.thumbnails.forEach((url) => URL.revokeObjectURL(url));
  state.thumbnails = [];
  state.images.clear();
  $("grid").replaceChildren();
  $("builder").hidden = true;
}

function addTile(image, first) {
  state.images.set(image.id, image);
  const tile = document.createElement("button");
  tile.type = "button";
  tile.className = "tile";
  tile.dataset.id = image.id;
  tile.style.aspectRatio = `${image.width} / ${image.height}`;
  Object.assign(tile.style, placeholderStyle(image.placeholder)); // painted before the render arrives
  const img = document.createElement("img");
  img.alt = image.original_filename || image.id;
  img.addEventListener("load", () => img.classList.add("loaded"));
  const caption = document.createElement("span");
  caption.className = "caption";
  const lock = image.visibility === "private" ? "private · " : "";
  caption.textContent = `${lock}${image.original_filename || image.id} · ${image.width}×${image.height}`;
  tile.append(img, caption);
  tile.addEventListener("click", () => select(image.id));
  if (first) $("grid").prepend(tile);
  else $("grid").append(tile);
  loadThumbnail(image, img);
}

async function loadThumbnail(image, img) {
  const list = candidates(image);
  const pick = list.find((c) => c.w >= 256) || list[list.length - 1];
  try {
    const blob = await (await api(local(pick.url))).blob();
    const url = URL.createObjectURL(blob);
    state.thumbnails.push(url);
    img.src = url;
  } catch (error) {
    say(`${image.id}: ${error.message}`, true);
  }
}

// ---------------------------------------------------------------- builder

function select(id) {
  const image = state.images.get(id);
  if (!image) return;
  state.selected = id;
  for (const tile of $("grid").children) tile.classList.toggle("selected", tile.dataset.id === id);
  $("builder").hidden = false;
  $("builder-name").textContent = `${image.original_filename || image.id} (${image.width} × ${image.height})`;
  $("widths").replaceChildren(
    ...candidates(image).map((c) => Object.assign(document.createElement("option"), { value: String(c.w) })),
  );
  const width = document.querySelector('#params [name="w"]');
  if (width.value === "") width.value = String((candidates(image).find((c) => c.w >= 640) || {}).w || "");
  writeSnippets(image);
  refreshPreview();
}

function builderQuery() {
  const params = new URLSearchParams();
  for (const field of $("params").querySelectorAll("input, select")) {
    if (field.value !== "") params.set(field.name, field.value);
  }
  return params.toString();
}

function serverTiming(header) {
  if (!header) return "";
  return header
    .split(",")
    .map((entry) => {
      const [name, ...params] = entry.trim().split(";");
      const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
      return dur ? `${name} ${dur.slice(4)} ms` : name;
    })
    .join(", ");
}

async function refreshPreview() {
  const image = state.images.get(state.selected);
  if (!image) return;
  const query = builderQuery();
  const url = image.urls.render + (query ? `?${query}` : "");
  $("url").value = url;
  state.preview?.abort();
  const abort = new AbortController();
  state.preview = abort;
  const started = performance.now();
  try {
    const response = await api(local(url), { signal: abort.signal });
    const blob = await response.blob();
    const roundTrip = performance.now() - started;
    const length = response.headers.get("content-length");
    const timing = serverTiming(response.headers.get("server-timing"));
    $("fact-type").textContent = response.headers.get("content-type") || "–";
    $("fact-bytes").textContent = `${Number(length ?? blob.size).toLocaleString()} bytes`;
    $("fact-time").textContent = `${timing ? `${timing}; ` : ""}${roundTrip.toFixed(0)} ms round trip`;
    $("fact-cache").textContent = response.headers.get("x-cache") || "–";
    const preview = $("preview");
    const previous = preview.src;
    preview.onload = () => {
      if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
      $("fact-size").textContent = `${preview.naturalWidth} × ${preview.naturalHeight}`;
      preview.dataset.query = query;
    };
    preview.src = URL.createObjectURL(blob);
    say("");
  } catch (error) {
    if (error.name !== "AbortError") say(error.message, true);
  }
}

function writeSnippets(image) {
  const list = candidates(image);
  const fallback = list.find((c) => c.w >= 640) || list[list.length - 1];
  const img =
    `<img src="${fallback.url}"\n     srcset="${image.srcset}"\n     sizes="${SIZES}" ` +
    `width="${image.width}" height="${image.height}" loading="lazy" alt="">`;
  const inFormat = (fmt) =>
    list.map((c) => `${c.url}${c.url.includes("?") ? "&" : "?"}fmt=${fmt} ${c.w}w`).join(", ");
  $("snippet-img").value = img;
  $("snippet-picture").value =
    `<picture>\n  <source type="image/avif" srcset="${inFormat("avif")}" sizes="${SIZES}">\n` +
    `  <source type="image/webp" srcset="${inFormat("webp")}" sizes="${SIZES}">\n  ${img.replace(/\n/g, "\n  ")}\n</picture>`;
}

async function copy(id) {
  const field = $(id);
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    field.select(); // not a secure context: the text is selected for Ctrl+C
  }
  say("Copied.");
}

// ---------------------------------------------------------------- delete

async function deleteSelected() {
  $("confirm").close();
  const id = state.selected;
  try {
    await api(`/images/${encodeURIComponent(id)}`, { method: "DELETE" });
    $("grid").querySelector(`[data-id="${CSS.escape(id)}"]`)?.remove();
    state.images.delete(id);
    state.selected = null;
    $("builder").hidden = true;
    say(`Deleted ${id}.`);
  } catch (error) {
    say(error.message, true);
  }
}

// ---------------------------------------------------------------- wiring

function useToken() {
  const value = $("token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
  loadImages().catch((error) => say(error.message, true));
}

function debounce(fn, ms) {
  let timer;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

$("token").value = token();
$("use-token").addEventListener("click", useToken);
$("token").addEventListener("keydown", (event) => event.key === "Enter" && useToken());
$("forget-token").addEventListener("click", () => {
  $("token").value = "";
  sessionStorage.removeItem(TOKEN_KEY);
  clearGrid();
  say("Token forgotten.");
});
$("file").addEventListener("change", () => uploadAll([...$("file").files]).then(() => ($("file").value = "")));
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  uploadAll([...event.dataTransfer.files]);
});
$("more").addEventListener("click", () => loadImages(true).catch((error) => say(error.message, true)));
$("params").addEventListener("input", debounce(refreshPreview, 250));
for (const button of document.querySelectorAll("[data-copy]")) {
  button.addEventListener("click", () => copy(button.dataset.copy));
}
$("delete").addEventListener("click", () => {
  const image = state.images.get(state.selected);
  $("confirm-name").textContent = image.original_filename || image.id;
  $("confirm").showModal();
});
$("confirm-cancel").addEventListener("click", () => $("confirm").close());
$("confirm-delete").addEventListener("click", deleteSelected);
loadImages().catch((error) => say(error.message, true));
