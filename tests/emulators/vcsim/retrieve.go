package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
	"github.com/vmware/govmomi/vim25/xml"
)

// Upstream answers RetrievePropertiesEx in one piece whatever options.maxObjects says, and
// lacks ContinueRetrievePropertiesEx. vCenter pages: at most maxObjects objects per answer
// (and it may page on its own), with a token for ContinueRetrievePropertiesEx. The emulator
// pages upstream's complete answer; `POST /_rehost/retrieve/page?objects=N` makes it page
// at N objects even without maxObjects, as a vCenter under load may.

var serverPageObjects int64 // 0: page only when the client sets maxObjects

type pagedResult struct {
	session string
	rest    []types.ObjectContent
	size    int
}

var (
	pagesMu sync.Mutex
	pages   = map[string]*pagedResult{}
)

func pageLimit(req *types.RetrievePropertiesEx) int {
	limit := 0
	if req.Options.MaxObjects > 0 {
		limit = int(req.Options.MaxObjects)
	}
	if s := int(atomic.LoadInt64(&serverPageObjects)); s > 0 && (limit == 0 || s < limit) {
		limit = s
	}
	return limit
}

// retrieveEnvelope decodes upstream's RetrievePropertiesEx answer.
type retrieveEnvelope struct {
	Body struct {
		Res *types.RetrievePropertiesExResponse `xml:"RetrievePropertiesExResponse"`
	} `xml:"Body"`
}

func sessionKey(r *http.Request) string {
	if c, err := r.Cookie("vmware_soap_session"); err == nil {
		return c.Value
	}
	return ""
}

// retrievePaged forwards RetrievePropertiesEx and pages the answer when a limit applies.
func (h *interceptor) retrievePaged(w http.ResponseWriter, r *http.Request, m *simulator.Method) {
	req := m.Body.(*types.RetrievePropertiesEx)
	limit := pageLimit(req)
	if limit == 0 {
		h.forward(w, r, m.Name)
		return
	}
	rec := httptest.NewRecorder()
	h.forward(rec, r, m.Name)
	if rec.Code != http.StatusOK {
		copyRecorded(w, rec)
		return
	}
	var env retrieveEnvelope
	dec := xml.NewDecoder(bytes.NewReader(rec.Body.Bytes()))
	dec.TypeFunc = types.TypeFunc()
	if err := dec.Decode(&env); err != nil || env.Body.Res == nil || env.Body.Res.Returnval == nil {
		copyRecorded(w, rec) // nothing to page (or not understood): answer as upstream did
		return
	}
	all := env.Body.Res.Returnval.Objects
	if len(all) <= limit {
		copyRecorded(w, rec)
		return
	}
	res := nextPage(sessionKey(r), all, limit)
	writeResult(w, &methods.RetrievePropertiesExBody{Res: &types.RetrievePropertiesExResponse{Returnval: &res}})
}

func nextPage(session string, objs []types.ObjectContent, limit int) types.RetrieveResult {
	if len(objs) <= limit {
		return types.RetrieveResult{Objects: objs}
	}
	var b [12]byte
	_, _ = rand.Read(b[:])
	token := hex.EncodeToString(b[:])
	pagesMu.Lock()
	pages[token] = &pagedResult{session: session, rest: objs[limit:], size: limit}
	pagesMu.Unlock()
	return types.RetrieveResult{Token: token, Objects: objs[:limit]}
}

func takePage(r *http.Request, token string) (*pagedResult, *methodFault) {
	pagesMu.Lock()
	defer pagesMu.Unlock()
	p := pages[token]
	if p == nil || p.session != sessionKey(r) {
		return nil, invalidArgument("token", "A specified parameter was not correct: token")
	}
	delete(pages, token)
	return p, nil
}

func continueRetrieve(r *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.ContinueRetrievePropertiesEx)
	p, f := takePage(r, req.Token)
	if f != nil {
		return nil, f
	}
	res := nextPage(p.session, p.rest, p.size)
	return &methods.ContinueRetrievePropertiesExBody{Res: &types.ContinueRetrievePropertiesExResponse{Returnval: res}}, nil
}

func cancelRetrieve(r *http.Request, m *simulator.Method) (soap.HasFault, *methodFault) {
	req := m.Body.(*types.CancelRetrievePropertiesEx)
	if _, f := takePage(r, req.Token); f != nil {
		return nil, f
	}
	return &methods.CancelRetrievePropertiesExBody{Res: new(types.CancelRetrievePropertiesExResponse)}, nil
}

func copyRecorded(w http.ResponseWriter, rec *httptest.ResponseRecorder) {
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}
