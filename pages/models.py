"""Models: the registry. Register a run as a model's next version, open a review of a candidate against
production on the model's fixed evaluation set, approve or reject it as the signed-in user (or a typed
name), promote it when its gate passed, roll production back, and download a review as one HTML file.

Every decision goes through `tlcore.deploy.model_registry` / `tlcore.deploy.review`; a refusal is shown as its sentence.
"""

import time

import pandas as pd
import streamlit as st

from tlcore.deploy import model_registry, review
from tlcore.deploy.review_report import review_html
from tlcore.errors import TransferLabError, plain_message
from ui import frame, gate, state

frame.require()

store = state.store()
tables = model_registry.registry(store)

st.title("Models")
st.caption("A model is a name with numbered versions (each a run) and aliases. `production` moves only through "
           "a review whose gate passed and that a reviewer approved; `serve --model NAME` serves it and follows it.")

finished = [r for r in store.list_runs() if r.status.value == "succeeded"]
run_label = {r.id: f"{r.name} · {100 * (r.accuracy or 0):.1f} %" for r in finished}


def attempt(action, done: str | None = None) -> bool:
    """Run `action`; show its refusal as the sentence it is. True when it went through."""
    try:
        action()
    except TransferLabError as exc:
        st.error(plain_message(exc))
        return False
    if done:
        st.toast(done)
    return True


signed_in = gate.user_name()
if signed_in:
    reviewer = signed_in
    st.sidebar.caption(f"Reviewing as {signed_in}")
else:
    reviewer = st.sidebar.text_input("Your name (for reviews and the audit trail)", key="models.reviewer").strip()

models = tables.list_models()

with st.expander("Register a run as a model version", expanded=not models):
    if not finished:
        st.info("No finished run yet. Train one on the **Train** page.")
    else:
        with st.form("models.register"):
            name = st.text_input("Model name", key="models.new_name",
                                 value=models[0].name if models else "")
            run_id = st.selectbox("Run", list(run_label), format_func=run_label.get, key="models.new_run")
            if st.form_submit_button("Register", type="primary"):
                if not reviewer:
                    st.error("Type your name in the sidebar first: every registry change says who made it.")
                elif attempt(lambda: model_registry.register(name.strip(), run_id, reviewer),
                             f"Registered {run_label[run_id]} under {name.strip()}."):
                    st.rerun()

if not models:
    st.stop()

state.keep_choice("models.model", [m.name for m in models])
name = st.selectbox("Model", [m.name for m in models], key="models.model")
shown = model_registry.describe(name, store)
fixed = shown["eval_set"]
st.caption(f"Fixed evaluation set: {fixed['images']} images of {fixed['dataset']} ({fixed['split']} split, "
           f"content hash `{fixed['content_hash'][:12]}`); every version is judged on exactly these.")

versions = pd.DataFrame([{"version": f"v{v['version']}", "run": v["run_name"], "accuracy": v["accuracy"],
                          "macro F1": v["macro_f1"], "aliases": ", ".join(v["aliases"]),
                          "served": f"serve --model {name}" if "production" in v["aliases"] else "",
                          "registered by": v["registered_by"]} for v in shown["versions"]])
st.dataframe(versions, hide_index=True, width="stretch",
             column_config={"accuracy": st.column_config.NumberColumn(format="percent"),
                            "macro F1": st.column_config.NumberColumn(format="%.3f")})

# ------------------------------------------------------------------ reviews

st.subheader("Reviews")
with st.form("models.open"):
    candidate = st.selectbox("Candidate run", list(run_label), format_func=run_label.get, key="models.candidate")
    if st.form_submit_button("Open a review against production"):
        if not reviewer:
            st.error("Type your name in the sidebar first: every review says who opened it.")
        else:
            with st.spinner("Judging the candidate on the fixed evaluation set…"):
                if attempt(lambda: st.session_state.update(
                        {"models.review": review.open_review(name, candidate, reviewer, store).id})):
                    st.rerun()

reviews = tables.list_reviews(name)
if not reviews:
    st.info("No review of this model yet: pick a candidate run above.")
else:
    labels = {r.id: f"{r.id} · v{r.candidate_version} vs "
                    f"{'v' + str(r.baseline_version) if r.baseline_version else 'nothing'} · "
                    f"gate {'passed' if r.gate_passed else 'failed'} · {r.status}"
                    + (" · promoted" if r.promoted_at else "") for r in reviews}
    state.keep_choice("models.review", list(labels))
    chosen = tables.get_review(st.selectbox("Review", list(labels), format_func=labels.get, key="models.review"))
    evidence, comparison = chosen.evidence, chosen.evidence.get("comparison")
    (st.success if chosen.gate_passed else st.error)(
        f"Gate {'passed' if chosen.gate_passed else 'failed'}: " + " ".join(chosen.gate["reasons"]))
    columns = st.columns(4)
    candidate_facts = evidence["candidate"]
    columns[0].metric("Candidate accuracy", f"{100 * candidate_facts['accuracy']:.1f} %",
                      f"{100 * comparison['delta']:+.1f} pts" if comparison else None)
    if comparison:
        columns[1].metric("95 % interval (pts)",
                          f"{100 * comparison['ci_low']:+.1f} to {100 * comparison['ci_high']:+.1f}")
        columns[2].metric("Fixed / broken", f"{comparison['fixed']} / {comparison['broken']}")
        columns[3].metric("McNemar p", f"{comparison['mcnemar_p']:.3g}")
        per_class = pd.DataFrame(evidence["per_class"]).rename(columns={
            "recall_a": "production recall", "recall_b": "candidate recall", "delta": "delta (pts)"})
        per_class["delta (pts)"] *= 100
        st.dataframe(per_class, hide_index=True, width="stretch", column_config={
            "production recall": st.column_config.NumberColumn(format="percent"),
            "candidate recall": st.column_config.NumberColumn(format="percent"),
            "delta (pts)": st.column_config.NumberColumn(format="%+.1f")})
    if chosen.decided_by:
        st.markdown(f"**{chosen.status.capitalize()}** by {chosen.decided_by} at "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(chosen.decided_at))}"
                    + (f": {chosen.comment}" if chosen.comment else ""))
    if chosen.promoted_at:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(chosen.promoted_at))
        st.markdown(f"**Promoted** to production at {when}.")
    if chosen.status == "open":
        comment = st.text_area("Comment", key="models.comment")
        left, right = st.columns(2)
        for column, approve in ((left, True), (right, False)):
            if column.button("Approve" if approve else "Reject", key=f"models.{'approve' if approve else 'reject'}",
                             type="primary" if approve else "secondary", disabled=not reviewer):
                if attempt(lambda approve=approve: review.decide(chosen.id, approve, reviewer, comment, store)):
                    st.rerun()
        if not reviewer:
            st.caption("Type your name in the sidebar to approve or reject.")

    promote_col, report_col = st.columns(2)
    with promote_col:
        force = st.checkbox("Override the gate or the missing approval", key="models.force")
        reason = st.text_input("Why (kept in the audit trail)", key="models.reason") if force else ""
        if st.button("Promote to production", key="models.promote", disabled=not reviewer
                     or chosen.promoted_at is not None):
            if attempt(lambda: model_registry.promote(chosen.id, reviewer, force=force, reason=reason, store=store),
                       f"Production of {name} is now v{chosen.candidate_version}."):
                st.rerun()
    with report_col:
        st.download_button("Download the review report (HTML)", review_html(chosen, store),
                           file_name=f"{chosen.id}.html", mime="text/html", key="models.report")

# -------------------------------------------------------------- audit trail

st.subheader("Audit trail")
if shown["audit"]:
    st.dataframe(pd.DataFrame([{
        "when": time.strftime("%Y-%m-%d %H:%M", time.localtime(e["at"])), "who": e["by"], "alias": e["alias"],
        "from": f"v{e['from_version']}" if e["from_version"] is not None else "", "to": f"v{e['to_version']}",
        "action": e["action"], "review": e["review_id"] or "", "reason": e["reason"]} for e in shown["audit"]]),
        hide_index=True, width="stretch")
    if "production" in shown["aliases"] and st.button("Roll production back", key="models.rollback",
                                                      disabled=not reviewer):
        if attempt(lambda: model_registry.rollback(name, reviewer, "rolled back on the Models page", store),
                   "Production rolled back."):
            st.rerun()
else:
    st.caption("No alias has moved yet.")
