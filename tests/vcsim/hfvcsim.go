// hfvcsim: govmomi's vSphere API simulator (vcsim's engine, from Debian's
// golang-github-vmware-govmomi-dev 0.24.2) with the export half it lacks, for hyperfarm's tests.
//
// The stock simulator serves the inventory, power states, snapshots, sessions and datastore file
// transfer, but has no ExportVm/ExportSnapshot and cannot download through an NFC lease. This
// program adds them in front of it, the way vSphere behaves:
//
//   - ExportVm (refused with InvalidPowerState while the VM runs) and ExportSnapshot create a real
//     HttpNfcLease in the simulator's registry, so its state, info, progress, complete and abort
//     are the simulator's own; the lease's device URLs name the VM's disk files.
//   - GET /nfc/<lease>/<file> serves a disk's bytes, with Range (206) for resumed downloads.
//   - A lease that sees no HttpNfcLeaseProgress for -lease-timeout goes to state "error" (as
//     vSphere's do), and its transfers stop.
//   - Test knobs: -rate throttles transfers, -cut-after/-cut-times cut the first transfers mid-disk.
//
// It writes <dir>/url (https://127.0.0.1:<port>/sdk), <dir>/ca.pem (the CA that signed its
// certificate), and <dir>/events.jsonl (one line per lease event, for tests to assert on).
// Build (offline, GOPATH mode):
//
//	GOPATH=$scratch:/usr/share/gocode GO111MODULE=off go build -o hfvcsim hfvcsim.go
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

var (
	dir          = flag.String("dir", ".", "where to write url, ca.pem and events.jsonl")
	user         = flag.String("user", "hf-user", "the only user name accepted")
	password     = flag.String("password", "hf-secret", "the only password accepted")
	vmName       = flag.String("vm", "ubuntu-server", "name of the VM created with -disks")
	disks        = flag.String("disks", "", "comma-separated disk contents (files) of the VM, in boot order")
	cpus         = flag.Int("cpus", 2, "CPUs of the VM")
	memoryMB     = flag.Int("memory", 2048, "memory of the VM, MiB")
	firmware     = flag.String("firmware", "efi", "bios or efi")
	nics         = flag.Int("nics", 2, "vmxnet3 NICs of the VM")
	poweredOnVM  = flag.String("powered-on-vm", "running-vm", "name of a second VM, powered on, with the same disks")
	rate         = flag.Int64("rate", 0, "bytes per second of each transfer (0: unlimited)")
	cutAfter     = flag.Int64("cut-after", 0, "cut a transfer after this many bytes")
	cutTimes     = flag.Int("cut-times", 0, "cut this many transfers (the first ones)")
	leaseTimeout = flag.Duration("lease-timeout", 0, "a lease without progress for this long expires (0: never)")
	listen       = flag.String("listen", "127.0.0.1:0", "address to serve on")
	certIP       = flag.String("cert-ip", "127.0.0.1", "the IP address its certificate names, and its URL uses")
	urlHost      = flag.String("url-host", "", "host its URL names (default: -cert-ip); the certificate also names localhost")
	nfcHost      = flag.String("nfc-host", "", "serve the disks from a second port with a self-signed certificate, named in device URLs by this host and that certificate's sslThumbprint, as vCenter names its ESXi hosts (default: *, as ESXi does)")
	reverseLease = flag.Bool("reverse-lease", false, "list a lease's disks in reverse device order")
	badThumb     = flag.Bool("bad-thumbprint", false, "with -nfc-host: give a thumbprint that is not the certificate's")
)

// The certificate of the "ESXi host" that -nfc-host serves the disks from: self-signed, not
// from the CA (as many ESXi hosts' are), so only its sslThumbprint vouches for it.
var esxDER []byte

// The port the disks are served on with -nfc-host.
var esxPort int

// One lease made by this program.
type lease struct {
	ref      types.ManagedObjectReference
	sim      *simulator.HttpNfcLease
	files    map[string]string // URL file name -> local file
	last     time.Time         // last progress (or creation)
	state    string            // ready, done, aborted, expired
	progress int32
	calls    int
	entity   string
	urlID    string // the lease's name in its URLs (moref values hold characters URLs must not)
}

var (
	port    int
	mu      sync.Mutex
	leases  = map[string]*lease{}
	byURL   = map[string]*lease{}
	cuts    int
	evMu    sync.Mutex
	evFile  *os.File
	thisRe  = regexp.MustCompile(`<_this[^>]*type="(VirtualMachine|VirtualMachineSnapshot|HttpNfcLease)"[^>]*>([^<]+)</_this>`)
	rangeRe = regexp.MustCompile(`^bytes=(\d+)-$`)
)

func event(kv map[string]interface{}) {
	kv["t"] = time.Now().UnixNano() / 1e6
	b, _ := json.Marshal(kv)
	evMu.Lock()
	defer evMu.Unlock()
	_, _ = evFile.Write(append(b, '\n'))
}

// exporter receives ExportVm/ExportSnapshot, rewritten from the VM or snapshot they were sent to
// (the simulator dispatches a method to the object its _this names).
type exporter struct {
	self   types.ManagedObjectReference
	target types.ManagedObjectReference
}

func (e *exporter) Reference() types.ManagedObjectReference { return e.self }

func (e *exporter) ExportVm(ctx *simulator.Context, req *types.ExportVm) soap.HasFault {
	body := new(methods.ExportVmBody)
	vm, ok := simulator.Map.Get(e.target).(*simulator.VirtualMachine)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: e.target})
		return body
	}
	if vm.Runtime.PowerState != types.VirtualMachinePowerStatePoweredOff {
		body.Fault_ = simulator.Fault("The attempted operation cannot be performed in the current state (Powered on).",
			&types.InvalidPowerState{RequestedState: types.VirtualMachinePowerStatePoweredOff, ExistingState: vm.Runtime.PowerState})
		return body
	}
	ref, fault := newLease(ctx, vm.Reference(), vm.Name, vm.Config.Hardware.Device)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.ExportVmResponse{Returnval: ref}
	return body
}

func (e *exporter) ExportSnapshot(ctx *simulator.Context, req *types.ExportSnapshot) soap.HasFault {
	body := new(methods.ExportSnapshotBody)
	snap, ok := simulator.Map.Get(e.target).(*simulator.VirtualMachineSnapshot)
	if !ok {
		body.Fault_ = simulator.Fault("", &types.ManagedObjectNotFound{Obj: e.target})
		return body
	}
	name := snap.Vm.Value
	if vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine); ok {
		name = vm.Name
	}
	ref, fault := newLease(ctx, snap.Reference(), name, snap.Config.Hardware.Device)
	if fault != nil {
		body.Fault_ = fault
		return body
	}
	body.Res = &types.ExportSnapshotResponse{Returnval: ref}
	return body
}

func newLease(ctx *simulator.Context, entity types.ManagedObjectReference, name string, devices []types.BaseVirtualDevice) (types.ManagedObjectReference, *soap.Fault) {
	sim := simulator.NewHttpNfcLease(ctx, entity)
	l := &lease{ref: sim.Reference(), sim: sim, files: map[string]string{}, last: time.Now(), state: "ready", entity: entity.Value}
	mu.Lock()
	l.urlID = fmt.Sprintf("lease-%d", len(byURL)+1)
	byURL[l.urlID] = l
	mu.Unlock()
	var total int64
	controllers := map[int32]types.BaseVirtualDevice{}
	for _, d := range devices {
		controllers[d.GetVirtualDevice().Key] = d
	}
	host := "*"
	thumb := ""
	if *nfcHost != "" {
		host = *nfcHost + ":" + strconv.Itoa(esxPort)
		sum := sha1.Sum(esxDER)
		if *badThumb {
			sum[0] ^= 0xff
		}
		hexes := make([]string, len(sum))
		for i, b := range sum {
			hexes[i] = fmt.Sprintf("%02X", b)
		}
		thumb = strings.Join(hexes, ":")
	}
	var urls []types.HttpNfcLeaseDeviceUrl
	for _, d := range devices {
		disk, ok := d.(*types.VirtualDisk)
		if !ok {
			continue
		}
		backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		if !ok {
			continue
		}
		local, err := localPath(backing.FileName)
		if err != nil {
			return l.ref, simulator.Fault(err.Error(), &types.FileNotFound{FileFault: types.FileFault{File: backing.FileName}})
		}
		st, err := os.Stat(local)
		if err != nil {
			return l.ref, simulator.Fault(err.Error(), &types.FileNotFound{FileFault: types.FileFault{File: backing.FileName}})
		}
		// The key names the disk's controller (its type and bus number) and unit, as vSphere's do.
		slot := "unknown"
		if c, ok := controllers[disk.ControllerKey]; ok && disk.UnitNumber != nil {
			bus := c.(types.BaseVirtualController).GetVirtualController().BusNumber
			slot = fmt.Sprintf("%s%d:%d", reflect.TypeOf(c).Elem().Name(), bus, *disk.UnitNumber)
		}
		file := fmt.Sprintf("%s-disk-%d.vmdk", name, len(l.files))
		l.files[file] = local
		total += disk.CapacityInKB
		urls = append(urls, types.HttpNfcLeaseDeviceUrl{
			Key:           fmt.Sprintf("/%s/%s", entity.Value, slot),
			Url:           fmt.Sprintf("https://%s/nfc/%s/%s", host, l.urlID, file),
			SslThumbprint: thumb,
			Disk:          types.NewBool(true),
			TargetId:      file,
			FileSize:      st.Size(),
		})
	}
	if *reverseLease {
		for i, j := 0, len(urls)-1; i < j; i, j = i+1, j-1 {
			urls[i], urls[j] = urls[j], urls[i]
		}
	}
	sim.Info.DeviceUrl = urls
	sim.Info.Lease = l.ref
	sim.Info.TotalDiskCapacityInKB = total
	if *leaseTimeout > 0 {
		sim.Info.LeaseTimeout = int32(leaseTimeout.Seconds())
	}
	mu.Lock()
	leases[l.ref.Value] = l
	mu.Unlock()
	event(map[string]interface{}{"event": "lease", "lease": l.ref.Value, "url_id": l.urlID, "entity": entity.Value, "disks": len(l.files)})
	return l.ref, nil
}

// "[LocalDS_0] vm/disk.vmdk" -> the file in the datastore's directory.
func localPath(dsPath string) (string, error) {
	var p object.DatastorePath
	if !p.FromString(dsPath) {
		return "", fmt.Errorf("bad datastore path %q", dsPath)
	}
	for _, o := range simulator.Map.All("Datastore") {
		ds := o.(*simulator.Datastore)
		if ds.Name == p.Datastore {
			return filepath.Join(ds.Info.GetDatastoreInfo().Url, p.Path), nil
		}
	}
	return "", fmt.Errorf("no datastore %q", p.Datastore)
}

// The SOAP front: note lease calls, route exports to the exporter objects, pass the rest on.
func sdk(proxy *httputil.ReverseProxy) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, err := ioutil.ReadAll(io.LimitReader(r.Body, 16<<20))
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		text := string(body)
		for _, method := range []string{"ExportVm", "ExportSnapshot"} {
			if !strings.Contains(text, "<"+method) && !strings.Contains(text, ":"+method) {
				continue
			}
			if m := thisRe.FindStringSubmatch(text); m != nil && m[1] != "HttpNfcLease" {
				target := types.ManagedObjectReference{Type: m[1], Value: m[2]}
				self := types.ManagedObjectReference{Type: "HfExporter", Value: m[1] + ":" + m[2]}
				if simulator.Map.Get(self) == nil {
					simulator.Map.Put(&exporter{self: self, target: target})
				}
				text = strings.Replace(text, m[0], fmt.Sprintf(`<_this type="HfExporter">%s</_this>`, self.Value), 1)
			}
		}
		for _, method := range []string{"HttpNfcLeaseProgress", "HttpNfcLeaseComplete", "HttpNfcLeaseAbort"} {
			if !strings.Contains(text, "<"+method) && !strings.Contains(text, ":"+method) {
				continue
			}
			m := thisRe.FindStringSubmatch(text)
			if m == nil || m[1] != "HttpNfcLease" {
				continue
			}
			mu.Lock()
			l := leases[m[2]]
			expired := l != nil && l.state == "expired"
			if l != nil && !expired {
				switch method {
				case "HttpNfcLeaseProgress":
					l.last = time.Now()
					l.calls++
					if p := regexp.MustCompile(`<percent>(\d+)</percent>`).FindStringSubmatch(text); p != nil {
						v, _ := strconv.Atoi(p[1])
						l.progress = int32(v)
					}
				case "HttpNfcLeaseComplete":
					l.state = "done"
				case "HttpNfcLeaseAbort":
					l.state = "aborted"
				}
			}
			mu.Unlock()
			if l != nil {
				ev := map[string]interface{}{"event": method, "lease": m[2], "expired": expired}
				if p := regexp.MustCompile(`<percent>(\d+)</percent>`).FindStringSubmatch(text); p != nil {
					v, _ := strconv.Atoi(p[1])
					ev["percent"] = v
				}
				event(ev)
			}
			if expired {
				// vSphere answers calls on an expired lease with a fault.
				w.Header().Set("Content-Type", "text/xml; charset=utf-8")
				w.WriteHeader(http.StatusInternalServerError)
				fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>The operation is not allowed in the current state.</faultstring><detail><InvalidStateFault xmlns="urn:vim25" xsi:type="InvalidState"></InvalidStateFault></detail></soapenv:Fault></soapenv:Body></soapenv:Envelope>`)
				return
			}
		}
		r.Body = ioutil.NopCloser(bytes.NewReader([]byte(text)))
		r.ContentLength = int64(len(text))
		r.Header.Set("Content-Length", strconv.Itoa(len(text)))
		proxy.ServeHTTP(w, r)
	}
}

// GET /nfc/<lease>/<file>, with Range.
func nfc(w http.ResponseWriter, r *http.Request) {
	p := strings.Split(r.URL.Path, "/")
	if len(p) != 4 || r.Method != http.MethodGet {
		http.NotFound(w, r)
		return
	}
	mu.Lock()
	l := byURL[p[2]]
	var file string
	ok := false
	if l != nil && l.state == "ready" {
		file, ok = l.files[p[3]]
	}
	cut := int64(0)
	if ok && *cutAfter > 0 && cuts < *cutTimes {
		cuts++
		cut = *cutAfter
	}
	mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	f, err := os.Open(file)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	defer f.Close()
	st, _ := f.Stat()
	size := st.Size()
	start := int64(0)
	status := http.StatusOK
	if rg := r.Header.Get("Range"); rg != "" {
		m := rangeRe.FindStringSubmatch(rg)
		if m == nil {
			http.Error(w, "unsupported range", http.StatusRequestedRangeNotSatisfiable)
			return
		}
		start, _ = strconv.ParseInt(m[1], 10, 64)
		if start > size {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", size))
			http.Error(w, "range", http.StatusRequestedRangeNotSatisfiable)
			return
		}
		status = http.StatusPartialContent
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", start, size-1, size))
	}
	event(map[string]interface{}{"event": "get", "url_id": p[2], "file": p[3], "from": start, "cut": cut})
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(size-start, 10))
	w.WriteHeader(status)
	_, _ = f.Seek(start, io.SeekStart)
	buf := make([]byte, 64<<10)
	sent := int64(0)
	began := time.Now()
	for {
		mu.Lock()
		live := l.state == "ready"
		mu.Unlock()
		if !live {
			hangUp(w)
			return
		}
		n, err := f.Read(buf)
		if n > 0 {
			chunk := buf[:n]
			if cut > 0 && sent+int64(n) > cut {
				chunk = buf[:cut-sent]
			}
			if _, werr := w.Write(chunk); werr != nil {
				return
			}
			sent += int64(len(chunk))
			if cut > 0 && sent >= cut {
				event(map[string]interface{}{"event": "cut", "url_id": p[2], "file": p[3], "at": start + sent})
				hangUp(w)
				return
			}
			if *rate > 0 {
				due := began.Add(time.Duration(float64(sent) / float64(*rate) * float64(time.Second)))
				if d := time.Until(due); d > 0 {
					time.Sleep(d)
				}
			}
		}
		if err != nil {
			return
		}
	}
}

// Close the connection mid-body: the client sees a transfer cut short.
func hangUp(w http.ResponseWriter) {
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	if hj, ok := w.(http.Hijacker); ok {
		if c, _, err := hj.Hijack(); err == nil {
			_ = c.Close()
		}
	}
}

// Expire leases that saw no progress for -lease-timeout.
func expirer() {
	for range time.Tick(100 * time.Millisecond) {
		mu.Lock()
		for id, l := range leases {
			if l.state == "ready" && time.Since(l.last) > *leaseTimeout {
				l.state = "expired"
				simulator.Map.WithLock(l.sim, func() {
					l.sim.State = types.HttpNfcLeaseStateError
					l.sim.Error = &types.LocalizedMethodFault{Fault: &types.Timedout{}, LocalizedMessage: "Lease timed out"}
				})
				go event(map[string]interface{}{"event": "expired", "lease": id})
			}
		}
		mu.Unlock()
	}
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}

// A server certificate for localhost and -cert-ip, signed by parent (self-signed when nil).
func serverCert(serial int64, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) ([]byte, tls.Certificate) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	check(err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP(*certIP)},
		DNSNames:     []string{"localhost"},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	check(err)
	return der, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// A CA (written to <dir>/ca.pem) and the API's certificate signed by it.
func certificate() tls.Certificate {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	check(err)
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "hfvcsim test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDer, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	check(err)
	caCert, err := x509.ParseCertificate(caDer)
	check(err)
	_, cert := serverCert(2, "127.0.0.1", caCert, caKey)
	pemCA := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDer})
	check(ioutil.WriteFile(filepath.Join(*dir, "ca.pem"), pemCA, 0o644))
	return cert
}

// The "ESXi host's" certificate for -nfc-host: self-signed, its fingerprint kept for the leases.
func selfSigned() tls.Certificate {
	der, cert := serverCert(3, "esx.hfvcsim", nil, nil)
	esxDER = der
	return cert
}

// Create a VM with the given disks (their content copied into the datastore) and NICs.
func createVM(ctx context.Context, c *govmomi.Client, name string, contents []string, powerOn bool) {
	finder := find.NewFinder(c.Client, false)
	dc, err := finder.DefaultDatacenter(ctx)
	check(err)
	finder.SetDatacenter(dc)
	folders, err := dc.Folders(ctx)
	check(err)
	pools, err := finder.ResourcePoolList(ctx, "*")
	check(err)
	pool := pools[0]
	ds, err := finder.DefaultDatastore(ctx)
	check(err)
	network, err := finder.Network(ctx, "VM Network")
	check(err)
	backing, err := network.EthernetCardBackingInfo(ctx)
	check(err)

	var devices object.VirtualDeviceList
	scsi, err := devices.CreateSCSIController("pvscsi")
	check(err)
	devices = append(devices, scsi)
	controller, err := devices.FindSCSIController("")
	check(err)
	for i, content := range contents {
		st, err := os.Stat(content)
		check(err)
		disk := devices.CreateDisk(controller, ds.Reference(), ds.Path(fmt.Sprintf("%s/%s_%d.vmdk", name, name, i)))
		disk.CapacityInKB = (st.Size() + 1023) / 1024
		devices = append(devices, disk)
	}
	for i := 0; i < *nics; i++ {
		nic, err := devices.CreateEthernetCard("vmxnet3", backing)
		check(err)
		card := nic.(types.BaseVirtualEthernetCard).GetVirtualEthernetCard()
		card.AddressType = string(types.VirtualEthernetCardMacTypeManual)
		card.MacAddress = fmt.Sprintf("00:50:56:a1:%02x:%02x", len(name)%256, i+1)
		devices = append(devices, nic)
	}
	changes, err := devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	check(err)
	for _, ch := range changes {
		spec := ch.GetVirtualDeviceConfigSpec()
		if _, ok := spec.Device.(*types.VirtualDisk); ok {
			spec.FileOperation = types.VirtualDeviceConfigSpecFileOperationCreate
		}
	}
	spec := types.VirtualMachineConfigSpec{
		Name:         name,
		GuestId:      "ubuntu64Guest",
		NumCPUs:      int32(*cpus),
		MemoryMB:     int64(*memoryMB),
		Firmware:     *firmware,
		Files:        &types.VirtualMachineFileInfo{VmPathName: "[" + ds.Name() + "]"},
		DeviceChange: changes,
	}
	task, err := folders.VmFolder.CreateVM(ctx, spec, pool, nil)
	check(err)
	info, err := task.WaitForResult(ctx, nil)
	check(err)
	vm := object.NewVirtualMachine(c.Client, info.Result.(types.ManagedObjectReference))
	// The simulator created empty disk files: give them their content.
	list, err := vm.Device(ctx)
	check(err)
	i := 0
	for _, d := range list.SelectByType((*types.VirtualDisk)(nil)) {
		b := d.(*types.VirtualDisk).Backing.(*types.VirtualDiskFlatVer2BackingInfo)
		local, err := localPath(b.FileName)
		check(err)
		data, err := ioutil.ReadFile(contents[i])
		check(err)
		check(ioutil.WriteFile(local, data, 0o644))
		i++
	}
	if powerOn {
		task, err := vm.PowerOn(ctx)
		check(err)
		check(task.Wait(ctx))
	}
}

func main() {
	flag.Parse()
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	var err error
	evFile, err = os.Create(filepath.Join(*dir, "events.jsonl"))
	check(err)

	model := simulator.VPX()
	model.Datastore = 1
	check(model.Create())
	model.Service.Listen = &url.URL{User: url.UserPassword(*user, *password)}
	inner := model.Service.NewServer()

	ctx := context.Background()
	admin := *inner.URL
	admin.User = url.UserPassword(*user, *password)
	c, err := govmomi.NewClient(ctx, &admin, true)
	check(err)
	var contents []string
	if *disks != "" {
		contents = strings.Split(*disks, ",")
	}
	if len(contents) > 0 {
		createVM(ctx, c, *vmName, contents, false)
		if *poweredOnVM != "" {
			createVM(ctx, c, *poweredOnVM, contents, true)
		}
	}
	check(c.Logout(ctx))

	target, _ := url.Parse(inner.URL.String())
	target.Path, target.User = "", nil
	proxy := httputil.NewSingleHostReverseProxy(target)
	mux := http.NewServeMux()
	mux.HandleFunc("/sdk", sdk(proxy))
	mux.HandleFunc("/nfc/", nfc)
	mux.Handle("/", proxy)

	ln, err := net.Listen("tcp", *listen)
	check(err)
	port = ln.Addr().(*net.TCPAddr).Port
	srv := &http.Server{
		Handler:      mux,
		TLSConfig:    &tls.Config{Certificates: []tls.Certificate{certificate()}},
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){}, // HTTP/1.1 only
	}
	if *leaseTimeout > 0 {
		go expirer()
	}
	if *nfcHost != "" {
		// The "ESXi host": its own listener and self-signed certificate, serving the disks.
		esxLn, err := net.Listen("tcp", strings.Split(*listen, ":")[0]+":0")
		check(err)
		esxPort = esxLn.Addr().(*net.TCPAddr).Port
		esxMux := http.NewServeMux()
		esxMux.HandleFunc("/nfc/", nfc)
		esx := &http.Server{
			Handler:      esxMux,
			TLSConfig:    &tls.Config{Certificates: []tls.Certificate{selfSigned()}},
			TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		}
		go func() {
			err := esx.ServeTLS(esxLn, "", "")
			if err != http.ErrServerClosed {
				log.Fatal(err)
			}
		}()
	}
	shownHost := *certIP
	if *urlHost != "" {
		shownHost = *urlHost
	}
	u := fmt.Sprintf("https://%s:%d/sdk", shownHost, port)
	check(ioutil.WriteFile(filepath.Join(*dir, "url.tmp"), []byte(u+"\n"), 0o644))
	check(os.Rename(filepath.Join(*dir, "url.tmp"), filepath.Join(*dir, "url")))
	log.Printf("serving %s", u)
	go func() {
		err := srv.ServeTLS(ln, "", "")
		if err != http.ErrServerClosed {
			log.Fatal(err)
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	_ = srv.Close()
	inner.Close()
}
