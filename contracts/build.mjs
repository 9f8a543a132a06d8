// Compile the contracts with solc-js (standard JSON) and write artifacts/<Name>.json.
// `node build.mjs --check` recompiles and fails if the committed artifacts differ.
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync, readdirSync, existsSync, mkdirSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import solc from 'solc';

const here = dirname(fileURLToPath(import.meta.url));
const check = process.argv.includes('--check');
const sources = {};
for (const dir of ['src', 'test']) {
  for (const f of readdirSync(join(here, dir)).filter((n) => n.endsWith('.sol')).sort()) {
    sources[`${dir}/${f}`] = { content: readFileSync(join(here, dir, f), 'utf8') };
  }
}
const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    metadata: { bytecodeHash: 'none', appendCBOR: false },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object', 'storageLayout'] } },
  },
};
function findImports(path) {
  const candidates = [join(here, 'node_modules', path), join(here, path)];
  for (const p of candidates) if (existsSync(p)) return { contents: readFileSync(p, 'utf8') };
  return { error: `import not found: ${path}` };
}
const out = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
const errors = (out.errors || []).filter((e) => e.severity === 'error');
if (errors.length) {
  for (const e of errors) console.error(e.formattedMessage);
  process.exit(1);
}
const sourcesSha256 = createHash('sha256').update(JSON.stringify(sources)).digest('hex');
const wanted = { 'src/DstackKms.sol': ['DstackKms'], 'src/DstackApp.sol': ['DstackApp'],
  'test/DstackUpgradesV2.sol': ['DstackKmsV2', 'DstackAppV3'] };
// storage as {label, slot, offset, type}: what an upgrade must keep (the AST ids solc puts in
// type names are dropped, so the layout does not change when unrelated sources do)
const layout = (l) => (l.storage || []).map((v) => ({
  label: v.label, slot: v.slot, offset: v.offset, type: l.types[v.type].label,
}));
const proxy = '@openzeppelin/contracts/proxy/ERC1967/ERC1967Proxy.sol';
if (!existsSync(join(here, 'artifacts'))) mkdirSync(join(here, 'artifacts'));
let stale = [];
const emit = (file, name) => {
  const c = out.contracts[file][name];
  const artifact = JSON.stringify({
    contractName: name, compiler: `solc-js ${solc.version()}`, sourcesSha256,
    abi: c.abi, bytecode: '0x' + c.evm.bytecode.object, deployedBytecode: '0x' + c.evm.deployedBytecode.object,
    storageLayout: layout(c.storageLayout),
  }, null, 2) + '\n';
  const path = join(here, 'artifacts', `${name}.json`);
  if (check) {
    if (!existsSync(path) || readFileSync(path, 'utf8') !== artifact) stale.push(name);
  } else {
    writeFileSync(path, artifact);
  }
};
for (const [file, names] of Object.entries(wanted)) for (const n of names) emit(file, n);
if (out.contracts[proxy]) emit(proxy, 'ERC1967Proxy');
if (check && stale.length) {
  console.error(`artifacts out of date: ${stale.join(', ')} (run: bash scripts/build-contracts.sh)`);
  process.exit(1);
}
console.log(check ? 'artifacts match the sources' : `wrote artifacts (solc ${solc.version()})`);
