// Validates Kubernetes objects against the schemas of their API: Istio's CRDs (1.29.2, through
// @kubernetes-models/istio), cert-manager's CRDs (through @kubernetes-models/cert-manager) and
// Kubernetes' own OpenAPI (through kubernetes-models). Reads a JSON
// array of {model, object} on stdin, `model` naming the schema as API version and kind
// (`extensions.istio.io/v1alpha1/WasmPlugin`, `apps/v1/Deployment`, or a part of one such as
// `v1/Volume`); prints one JSON line per item: {model, error}, error null when valid.
// Usage: node validate.mjs NODE_MODULES_DIR < items.json
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node validate.mjs NODE_MODULES_DIR < items.json");
  process.exit(2);
}

// `networking.istio.io/v1alpha3/EnvoyFilter` -> @kubernetes-models/istio/networking.istio.io/
// v1alpha3/EnvoyFilter.js; `cert-manager.io/v1/Certificate` -> @kubernetes-models/cert-manager/
// cert-manager.io/v1/Certificate.js; `apps/v1/Deployment` -> kubernetes-models/apps/v1/Deployment.js;
// `v1/Pod` -> kubernetes-models/v1/Pod.js.
function modelPath(model) {
  const parts = model.split("/");
  const kind = parts.pop();
  const pkg = parts[0].endsWith("istio.io")
    ? "@kubernetes-models/istio"
    : parts[0] === "cert-manager.io"
      ? "@kubernetes-models/cert-manager"
      : "kubernetes-models";
  return [join(modules, pkg, ...parts, `${kind}.js`), kind];
}

const items = JSON.parse(readFileSync(0, "utf8"));
for (const { model, object } of items) {
  let error = null;
  try {
    const [path, kind] = modelPath(model);
    const exports = await import(pathToFileURL(path));
    new exports[kind](object).validate();
  } catch (e) {
    error = e.message;
  }
  console.log(JSON.stringify({ model, error }));
}
