import { useEffect, useState, type FormEvent } from "react";
import { api } from "../lib/api";
import { useAction } from "../lib/hooks";
import { bytes } from "../lib/format";
import type { Settings } from "../lib/types";
import { Card, ErrorBox, Loading } from "../components/common";
import { ModelCacheCard } from "../components/ModelFetch";

export function SettingsPage() {
  const [settings, setSettings] = useState<Settings | null>(null);
  const [training, setTraining] = useState("");
  const [datasets, setDatasets] = useState("");
  const [token, setToken] = useState("");
  const [saved, setSaved] = useState<string | null>(null);
  const action = useAction();

  const take = (s: Settings) => {
    setSettings(s);
    setTraining(s.training_folder);
    setDatasets(s.datasets_folder);
  };
  useEffect(() => { void action.run(() => api.get<Settings>("/api/settings")).then((s) => s && take(s)); }, [action.run]);

  const put = async (body: Record<string, string>, what: string) => {
    setSaved(null);
    const s = await action.run(() => api.put<Settings>("/api/settings", body));
    if (s) { take(s); setSaved(what); }
  };
  const saveFolders = (event: FormEvent) => { event.preventDefault(); void put({ training_folder: training, datasets_folder: datasets }, "Folders saved."); };
  const saveToken = (event: FormEvent) => { event.preventDefault(); void put({ hf_token: token.trim() }, "Token saved."); setToken(""); };

  if (!settings) return <div className="page"><h1>Settings</h1>{action.error ? <ErrorBox message={action.error} /> : <Loading />}</div>;
  return (
    <div className="page">
      <h1>Settings</h1>
      {action.error ? <ErrorBox message={action.error} /> : null}
      {saved ? <p className="ok-line" data-testid="settings-saved">{saved}</p> : null}
      <Card title="Folders">
        <form onSubmit={saveFolders} className="fields">
          <div className="field field-wide">
            <label htmlFor="s-training">Training output</label>
            <input id="s-training" value={training} onChange={(e) => setTraining(e.target.value)} />
            <div className="help">Each job writes to &lt;this folder&gt;/&lt;job name&gt;/. A job keeps the folder it was created with.</div>
          </div>
          <div className="field field-wide">
            <label htmlFor="s-datasets">Datasets</label>
            <input id="s-datasets" value={datasets} onChange={(e) => setDatasets(e.target.value)} />
            <div className="help">Each dataset is a folder in here.</div>
          </div>
          <div><button type="submit" className="btn btn-primary" disabled={action.busy}>Save folders</button></div>
        </form>
      </Card>
      <Card title="Hugging Face token">
        <p className="small">
          {settings.hf_token_set ? <>A token is set ({settings.hf_token_hint}).</> : "No token set."} Jobs get it as
          <code> HF_TOKEN</code>, for gated models and uploads. It is never shown again.
        </p>
        <form onSubmit={saveToken} className="row">
          <input type="password" autoComplete="off" value={token} onChange={(e) => setToken(e.target.value)} placeholder="hf_…" />
          <button type="submit" className="btn btn-primary" disabled={action.busy || !token.trim()}>Save token</button>
          {settings.hf_token_set ? (
            <button type="button" className="btn btn-danger" disabled={action.busy} onClick={() => void put({ hf_token: "" }, "Token removed.")}>Remove token</button>
          ) : null}
        </form>
      </Card>
      <ModelCacheCard />
      <Card title="Server">
        <ul className="small">
          <li>Sign-in token required: {settings.auth_required ? "yes (AI_TOOLKIT_AUTH)" : "no (this machine only)"}</li>
          <li>Database: {settings.database}</li>
          <li>Largest upload: {bytes(settings.max_upload_bytes)}</li>
        </ul>
      </Card>
    </div>
  );
}
