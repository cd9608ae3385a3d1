import { useState, type FormEvent } from "react";
import { api } from "../lib/api";
import { useAction, usePoll } from "../lib/hooks";
import { bytes } from "../lib/format";
import { Link, navigate } from "../lib/router";
import type { DatasetSummary } from "../lib/types";
import { Card, Empty, ErrorBox, Loading } from "../components/common";

export function Datasets() {
  const { data, error } = usePoll(() => api.get<{ folder: string; datasets: DatasetSummary[] }>("/api/datasets"), 10000, []);
  const [name, setName] = useState("");
  const create = useAction();

  const onCreate = async (event: FormEvent) => {
    event.preventDefault();
    const made = await create.run(() => api.post<DatasetSummary>("/api/datasets", { name: name.trim() }));
    if (made) navigate(`/datasets/${encodeURIComponent(made.name)}`);
  };

  return (
    <div className="page">
      <h1>Datasets</h1>
      <Card title="New dataset">
        <form className="row" onSubmit={onCreate}>
          <input data-testid="dataset-name" value={name} onChange={(e) => setName(e.target.value)} placeholder="name, e.g. my_dog"
            pattern="[A-Za-z0-9][A-Za-z0-9._\-]*" title="letters, digits, '.', '_' or '-'" required />
          <button type="submit" className="btn btn-primary" disabled={create.busy} data-testid="create-dataset">Create</button>
        </form>
        {create.error ? <ErrorBox message={create.error} /> : null}
      </Card>
      {error ? <ErrorBox message={error} /> : null}
      {!data ? <Loading /> : (
        <Card title={`In ${data.folder}`}>
          {data.datasets.length ? (
            <table className="table" data-testid="datasets-table">
              <thead><tr><th>Name</th><th>Images</th><th>Videos</th><th>Captions</th><th>Size</th></tr></thead>
              <tbody>
                {data.datasets.map((d) => (
                  <tr key={d.name}>
                    <td><Link to={`/datasets/${encodeURIComponent(d.name)}`}>{d.name}</Link></td>
                    <td>{d.images}</td><td>{d.videos}</td><td>{d.captions}</td><td>{bytes(d.bytes)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          ) : <Empty>No datasets yet: create one above, then drop your images in.</Empty>}
        </Card>
      )}
    </div>
  );
}
