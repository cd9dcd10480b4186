// Check KEDA ScaledObjects with @kubernetes-models/keda, whose validators are generated from
// KEDA's CRDs, and refuse fields its TypeScript declarations do not declare (the generated
// validators accept unknown fields; the API server, under `kubectl apply`, refuses them).
//
//   node tests/deploy/keda_validate.mjs PREFIX < objects.json
//
// PREFIX is where tools/keda is installed (`npm ci --prefix`; scripts/install.sh uses .tools/keda).
// stdin: a JSON array of objects. stdout: {"version": V, "errors": [[message, ...], ...]}, one
// list per object, in order, empty where the object is valid. Exit 2 if the package is missing.
import { existsSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve } from "node:path";
import { pathToFileURL } from "node:url";

const PACKAGE = "@kubernetes-models/keda";

function fail(message) {
  process.stderr.write(`keda_validate: ${message}\n`);
  process.exit(2);
}

const prefix = process.argv[2];
if (!prefix) fail("usage: node keda_validate.mjs PREFIX < objects.json");
const packageDir = resolve(prefix, "node_modules", PACKAGE);
const classFile = join(packageDir, "keda.sh", "v1alpha1", "ScaledObject.js");
if (!existsSync(classFile)) fail(`${PACKAGE} is not installed under ${resolve(prefix)}`);
const { version } = JSON.parse(readFileSync(join(packageDir, "package.json"), "utf8"));
const { ScaledObject } = await import(pathToFileURL(classFile).href);

// ------------------------------------------------------------- the declared fields (.d.ts)

const files = new Map(); // path of a .d.ts -> {imports, aliases, interfaces}

function matchingClose(text, open) {
  let depth = 0;
  for (let i = open; i < text.length; i++) {
    if (text[i] === "{") depth++;
    else if (text[i] === "}" && --depth === 0) return i;
  }
  throw new Error("unbalanced braces");
}

function splitMembers(body) {
  const members = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < body.length; i++) {
    const c = body[i];
    if ("{<([".includes(c)) depth++;
    else if ("}>)]".includes(c)) depth--;
    else if ((c === ";" || c === ",") && depth === 0) {
      members.push(body.slice(start, i).trim());
      start = i + 1;
    }
  }
  members.push(body.slice(start).trim());
  return members.filter(Boolean);
}

function parseType(text) {
  const t = text.trim();
  let m = /^Array<([\s\S]+)>$/.exec(t);
  if (m) return { array: parseType(m[1]) };
  m = /^\{\s*\[\s*\w+\s*:\s*string\s*\]\s*:\s*([\s\S]+?);?\s*\}$/.exec(t);
  if (m) return { map: parseType(m[1]) };
  if (/^\w+$/.test(t)) return { ref: t };
  return {}; // a primitive, a union of literals: nothing to descend into
}

function parseFile(path) {
  if (files.has(path)) return files.get(path);
  const text = readFileSync(path, "utf8")
    .replace(/\/\*[\s\S]*?\*\//g, "")
    .replace(/^\s*\/\/.*$/gm, "");
  const imports = new Map(); // local name -> {from, name}
  for (const m of text.matchAll(/import\s*(?:type\s*)?\{([^}]*)\}\s*from\s*"([^"]+)"/g)) {
    for (const item of m[1].split(",").map((s) => s.trim()).filter(Boolean)) {
      const [name, local = name] = item.split(/\s+as\s+/);
      imports.set(local.trim(), { from: m[2], name: name.trim() });
    }
  }
  const aliases = new Map(); // exported name -> local name
  for (const m of text.matchAll(/export\s+type\s*\{([^}]*)\}/g)) {
    for (const item of m[1].split(",").map((s) => s.trim()).filter(Boolean)) {
      const [local, exported = local] = item.split(/\s+as\s+/);
      aliases.set(exported.trim(), local.trim());
    }
  }
  const interfaces = new Map(); // name -> {props: Map(name -> type), open}
  for (const m of text.matchAll(/export\s+interface\s+(\w+)[^{]*\{/g)) {
    const open = m.index + m[0].length - 1;
    const body = text.slice(open + 1, matchingClose(text, open));
    const props = new Map();
    let indexed = false;
    for (const member of splitMembers(body)) {
      const p = /^(?:"([^"]+)"|(\w+))\??\s*:\s*([\s\S]+)$/.exec(member);
      if (p) props.set(p[1] ?? p[2], parseType(p[3]));
      else if (member.startsWith("[")) indexed = true;
      else throw new Error(`${path}: cannot read member ${JSON.stringify(member)} of ${m[1]}`);
    }
    interfaces.set(m[1], { name: m[1], file: path, props, open: indexed });
  }
  const parsed = { imports, aliases, interfaces };
  files.set(path, parsed);
  return parsed;
}

function resolveModule(fromFile, specifier) {
  const strip = (s) => s.replace(/\.js$/, "");
  if (specifier.startsWith(".")) return resolve(dirname(fromFile), `${strip(specifier)}.d.ts`);
  const parts = specifier.split("/");
  const n = specifier.startsWith("@") ? 2 : 1;
  const pkg = parts.slice(0, n).join("/");
  const sub = parts.slice(n).join("/");
  for (let dir = dirname(fromFile); ; dir = dirname(dir)) {
    const candidate = join(dir, "node_modules", pkg);
    if (existsSync(candidate)) return join(candidate, sub ? `${strip(sub)}.d.ts` : "index.d.ts");
    if (dirname(dir) === dir) throw new Error(`${fromFile}: cannot find ${specifier}`);
  }
}

// The interface `name` names in `path` (declared there, exported under another name, or
// imported), or null where it is not an interface (a type alias such as Time or Quantity).
function lookup(path, name) {
  const { imports, aliases, interfaces } = parseFile(path);
  if (interfaces.has(name)) return interfaces.get(name);
  if (aliases.has(name) && aliases.get(name) !== name) return lookup(path, aliases.get(name));
  if (imports.has(name)) {
    const target = imports.get(name);
    return lookup(resolveModule(path, target.from), target.name);
  }
  return null;
}

function undeclared(value, type, path, where, errors) {
  const isObject = value !== null && typeof value === "object" && !Array.isArray(value);
  if (type.array && Array.isArray(value)) {
    value.forEach((item, i) => undeclared(item, type.array, `${path}/${i}`, where, errors));
  } else if (type.map && isObject) {
    for (const [key, item] of Object.entries(value)) undeclared(item, type.map, `${path}/${key}`, where, errors);
  } else if (type.ref && isObject) {
    const iface = lookup(where, type.ref);
    if (iface === null) return;
    for (const [key, item] of Object.entries(value)) {
      if (iface.props.has(key)) undeclared(item, iface.props.get(key), `${path}/${key}`, iface.file, errors);
      else if (!iface.open) {
        const declared = relative(resolve(prefix, "node_modules"), iface.file);
        errors.push(`data${path}/${key} is not a field of ${iface.name} (${declared})`);
      }
    }
  }
}

const declarations = classFile.replace(/\.js$/, ".d.ts");
const root = lookup(declarations, "IScaledObject");
if (root === null || !["apiVersion", "kind", "metadata", "spec"].every((p) => root.props.has(p))) {
  fail(`cannot read the fields of IScaledObject from ${declarations}`);
}

// ------------------------------------------------------------------------------ validation

function check(obj) {
  const errors = [];
  // The model fills in apiVersion and kind where they are missing: they must be there and its own.
  for (const key of ["apiVersion", "kind"]) {
    if (obj?.[key] !== ScaledObject[key]) errors.push(`data/${key} must be ${JSON.stringify(ScaledObject[key])}`);
  }
  try {
    new ScaledObject(obj).validate();
  } catch (err) {
    if (!Array.isArray(err.errors)) throw err;
    errors.push(...err.errors.map((e) => `data${e.instancePath} ${e.message}`));
  }
  undeclared(obj, { ref: "IScaledObject" }, "", declarations, errors);
  // The API server requires a name (every CRD's metadata is ObjectMeta).
  if (typeof obj?.metadata?.name !== "string") errors.push("data/metadata/name must be string");
  return errors;
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const objects = JSON.parse(Buffer.concat(chunks).toString("utf8"));
if (!Array.isArray(objects)) fail("stdin must be a JSON array of objects");
process.stdout.write(`${JSON.stringify({ version, errors: objects.map(check) })}\n`);
